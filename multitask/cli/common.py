"""Options several subcommands share."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import get_args

from multitask.training.tracking import WandbMode


def add_wandb(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wandb", choices=get_args(WandbMode), default="offline",
                   help="Weights & Biases tracking: offline (default; no account or network), online, off")


def add_no_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_run_options(p: argparse.ArgumentParser, run_dir: str) -> None:
    """What every trainer's command takes: where its run lives, starting over, progress, W&B."""
    p.add_argument("--run-dir", type=Path, help=f"training state, metrics, W&B files (default: {run_dir})")
    p.add_argument("--restart", action="store_true", help="discard a previous run's checkpoint instead of resuming it")
    add_no_progress(p)
    add_wandb(p)
