"""`multitask baseline train`: the jointly trained multi-task DQN."""

from __future__ import annotations

import argparse

from multitask.cli.common import add_config_options, add_run_options, require_config


def cmd_baseline_train(args: argparse.Namespace) -> None:
    from multitask.training.baseline import load_config, train_baseline

    require_config(args, "configs/baseline/<name>.toml")
    cfg = load_config(args.config, args.overrides)
    train_baseline(cfg, run_dir=args.run_dir, wandb_mode=args.wandb, restart=args.restart,
                   show_progress=not args.no_progress)


def add_commands(sub) -> None:
    b = sub.add_parser("baseline", help="the multi-task DQN baseline, trained jointly online on all games").add_subparsers(dest="action", required=True)
    bt = b.add_parser("train", help="train one multi-task DQN on every game at once (resumes when run again)")
    add_config_options(bt, "batch_mode=mixed seed=1 dqn.lr=1e-4", "configs/baseline/minatar.toml")
    add_run_options(bt, "runs/baseline/<run name>")
    bt.set_defaults(func=cmd_baseline_train)
