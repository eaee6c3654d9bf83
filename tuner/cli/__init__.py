"""The `tuner` command line (`tuner.cli:main`), one module per job: `parser` builds the commands and dispatches,
`unlearn` runs one unlearning (and `apply`s settings files), `study` runs and shows studies, `catalogue` lists
methods and testbeds, `render` prints, `crash` ends failed commands. Nothing here loads torch at import: each
command imports what it needs when it runs. The CLI is the top layer: it may import every other."""

from tuner.cli.parser import build_parser, main

__all__ = ["build_parser", "main"]
