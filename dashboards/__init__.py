"""Pareto dashboards for unlearning studies: Plotly figures, a Dash app and a self-contained HTML export.

Everything here reads the study store (`tuner.store.Store`) and never writes to it:

- `data`: one study from the store as plain rows, each trial classified by outcome against the spec's target;
- `queries`: the read-only store queries the `Store` class does not have (all curves of a study, the list page);
- `figures`: pure functions from that data to Plotly figures, one module per view;
- `guidelines`: the brief's five tuning guidelines, each checked on the study's own data;
- `app`: the Dash web app (`tuner dashboard`), its pages in `layouts` and its study cache in `cache`;
  `server`: waitress serving it; `report`: one offline HTML file (`tuner dashboard export`);
- `cli`: the `dashboard` subcommand.
"""
