"""Options several subcommands share."""

from __future__ import annotations

import argparse


def add_wandb(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wandb", choices=("off", "offline", "online"), default="offline",
                   help="Weights & Biases tracking: offline (default; no account or network), online, off")


def add_no_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
