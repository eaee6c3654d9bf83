"""The `tuner dashboard` subcommand: serve the Dash app, or export one study as a self-contained HTML file.

    tuner dashboard [--storage URL] [--host 127.0.0.1] [--port 8050] [--token TOKEN]
    tuner dashboard export NAME -o report.html [--storage URL] [--abs-gap]

Wired into `tuner/cli/parser.py` with `dashboards.cli.add_parser(subparsers)`. User mistakes raise TunerError.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys

from tuner.core.errors import TunerError
from tuner.core.metrics import PARETO_X

STORAGE_HELP = "SQLAlchemy URL of the store (default: $TUNER_STORAGE or the user's SQLite file)"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add `dashboard` (and `dashboard export`) to the `tuner` subcommands."""
    d = subparsers.add_parser(
        "dashboard", help="browse studies: Pareto fronts, robustness maps, curves and guideline checks",
        description="Serve the dashboards (a study list and a page per study; pages refresh while a study runs) "
        "or export one study as a single offline HTML file.")
    d.add_argument("--storage", help=STORAGE_HELP)
    d.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; anything else needs --token)")
    d.add_argument("--port", type=int, default=8050, help="port (default 8050)")
    d.add_argument("--token", default=os.environ.get("TUNER_DASHBOARD_TOKEN"),
                   help="require ?token=TOKEN on the first visit (default: $TUNER_DASHBOARD_TOKEN)")
    d.set_defaults(func=cmd_dashboard, dashboard_command=None)
    ds = d.add_subparsers(dest="dashboard_command")
    e = ds.add_parser("export", help="write one study's dashboards as a self-contained HTML file (opens offline)",
                      description="Write the study page (figures with plotly.js inlined, guideline checks, "
                      "recommendation and trial table) to one HTML file that needs no network.")
    e.add_argument("name", help="study name")
    e.add_argument("-o", "--output", required=True, help="HTML file to write, e.g. report.html")
    e.add_argument("--storage", default=argparse.SUPPRESS, help=STORAGE_HELP)
    e.add_argument("--abs-gap", action="store_true", help="plot |forget gap| instead of the signed gap")
    e.add_argument("--x", default="signed", choices=["signed", "abs", *PARETO_X],
                   help="the Pareto figure's x axis: the signed or absolute forget gap, or a forget-side metric "
                        "(privleak, MIA AUC, MinK++ AUC, exact memorisation, extraction strength); default: signed")
    e.set_defaults(func=cmd_dashboard_export)
    return d


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_dashboard(args: argparse.Namespace) -> int:
    from dashboards.app import create_app
    from dashboards.server import serve
    from tuner.store import safe_url

    if not 0 < args.port < 65536:
        raise TunerError(f"--port: {args.port} is not a port number (1-65535)")
    if not _is_loopback(args.host) and not args.token:
        raise TunerError(f"--host {args.host} exposes the dashboards beyond this machine: give --token (or "
                         "$TUNER_DASHBOARD_TOKEN), or keep the default 127.0.0.1")
    _check_port(args.host, args.port)
    app = create_app(args.storage, token=args.token)
    url = f"http://{args.host}:{args.port}/" + (f"?token={args.token}" if args.token else "")
    print(f"dashboards for {safe_url(_store_url(args))} at {url} (Ctrl+C to stop)", file=sys.stderr)
    serve(app, args.host, args.port)
    return 0


def _store_url(args: argparse.Namespace) -> str:
    from tuner.store import default_url, normalise_url

    return normalise_url(args.storage or default_url())


def _check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        try:
            sock.bind((host, port))
        except OSError as err:
            raise TunerError(f"cannot listen on {host}:{port}: {err.strerror} (try another --port)") from None


def cmd_dashboard_export(args: argparse.Namespace) -> int:
    from dashboards.report import export
    from tuner.store import Store

    store = Store(getattr(args, "storage", None), create=False)
    path = export(store, args.name, args.output, x="abs" if args.abs_gap else args.x)
    size = path.stat().st_size / 1e6
    print(f"wrote {path} ({size:.1f} MB, self-contained: opens offline)")
    return 0
