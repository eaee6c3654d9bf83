"""`tuner methods` and `tuner testbed`: what the tuner brings with it, the methods and the offline testbed."""

from __future__ import annotations

import argparse

from tuner.cli.render import Bars, print_manifest, print_methods, progress


def cmd_methods(args: argparse.Namespace) -> int:
    print_methods()
    return 0


def cmd_testbed_build(args: argparse.Namespace) -> int:
    from tuner.engine import testbed

    with progress() as bars:
        root = testbed.build(args.size, seed=args.seed, force=args.force, progress=Bars(bars))
    print_manifest(root)
    return 0


def cmd_testbed_show(args: argparse.Namespace) -> int:
    from tuner.engine import testbed

    root = testbed.build(args.size, seed=args.seed)
    print_manifest(root)
    return 0
