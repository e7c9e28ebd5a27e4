"""`multitask pipeline <config>`: every stage from teachers to the comparison report."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_pipeline(args: argparse.Namespace) -> None:
    from multitask.pipeline import run_pipeline

    run_pipeline(args.config, args.overrides)


def add_commands(sub) -> None:
    p = sub.add_parser("pipeline", help="every stage in order (datasets, students, multi-task DQN, comparison), "
                       "reusing what is done; stop it and run it again to continue")
    p.add_argument("config", type=Path, help="pipeline TOML, e.g. configs/pipeline/quickstart.toml")
    p.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. episodes=20)")
    p.set_defaults(func=cmd_pipeline)
