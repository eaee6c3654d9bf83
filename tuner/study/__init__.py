"""The study: the spec, the typed trial context, search, the trial a worker runs, recording to the store,
confirmations and rechecks, and the driver that ties them to Ray. It may import every layer below it (core,
engine, store, results); only the CLI and the dashboards import it."""
