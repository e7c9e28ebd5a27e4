"""Options several subcommands share."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import get_args

from multitask.errors import UserError
from multitask.training.tracking import WandbMode


def add_wandb(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wandb", choices=get_args(WandbMode), default="offline",
                   help="Weights & Biases tracking: offline (default; no account or network), online, off")


def add_no_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_device(p: argparse.ArgumentParser) -> None:
    from multitask.devices import DEVICE_DOC

    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help=f"where the agents play ({DEVICE_DOC.split(';')[0]}); scores are recorded with it")


def add_config_options(p: argparse.ArgumentParser, example_overrides: str, example_config: str) -> None:
    """A trainer's config: a TOML file and/or `key=value` overrides (one of them is required)."""
    p.add_argument("overrides", nargs="*", help=f"config overrides key=value (e.g. {example_overrides})")
    p.add_argument("--config", type=Path, help=f"TOML config, e.g. {example_config}")


def require_config(args: argparse.Namespace, example_config: str) -> None:
    if args.config is None and not args.overrides:
        raise UserError(f"give a config (--config {example_config}) or at least games=...")


def add_run_options(p: argparse.ArgumentParser, run_dir: str) -> None:
    """What every trainer's command takes: where its run lives, starting over, progress, W&B."""
    p.add_argument("--run-dir", type=Path, help=f"training state, metrics, W&B files (default: {run_dir})")
    p.add_argument("--restart", action="store_true", help="discard a previous run's checkpoint instead of resuming it")
    add_no_progress(p)
    add_wandb(p)


def add_executor(p: argparse.ArgumentParser, folder: str) -> None:
    """Where per-game jobs run (multitask/jobs.py): local processes, or submitit's local or Slurm executor."""
    p.add_argument("--executor", choices=("processes", "local", "slurm"), default="processes",
                   help="processes (default): this machine; local: submitit's local executor; slurm: one Slurm "
                        "job per game through submitit")
    p.add_argument("--jobs-dir", type=Path, default=Path(folder), help=f"submitit's logs and job files (default {folder})")
