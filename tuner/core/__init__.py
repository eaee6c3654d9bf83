"""The core: what a study or a run is made of, as declarations (errors, names, hyperparameters, settings,
precision names, testbed sizes, command-line flags, retries). It imports no other layer of the package and
never torch: the CLI's quick answers rest on it."""
