"""`multitask student train | sweep`."""

from __future__ import annotations

import argparse
from pathlib import Path

from multitask.cli.common import add_config_options, add_no_progress, add_run_options, add_wandb, require_config


def cmd_student_train(args: argparse.Namespace) -> None:
    from multitask import config as configlib
    from multitask.training.student import StudentConfig, train_student

    require_config(args, "configs/student/<name>.toml")
    cfg = configlib.load(StudentConfig, args.config, args.overrides)
    train_student(cfg, run_dir=args.run_dir, wandb_mode=args.wandb, restart=args.restart,
                  show_progress=not args.no_progress)


def cmd_student_drive(args: argparse.Namespace) -> None:
    from multitask import config as configlib
    from multitask.training.driven import DrivenConfig, train_driven

    require_config(args, "configs/driven/<name>.toml")
    cfg = configlib.load(DrivenConfig, args.config, args.overrides)
    train_driven(cfg, run_dir=args.run_dir, wandb_mode=args.wandb, restart=args.restart,
                 show_progress=not args.no_progress)


def cmd_student_sweep(args: argparse.Namespace) -> None:
    from multitask.training.sweep import run_sweep

    run_sweep(args.sweep, args.overrides, args.wandb, show_progress=not args.no_progress)


def add_commands(sub) -> None:
    st = sub.add_parser("student", help="distil teachers' datasets into one multi-head student").add_subparsers(dest="action", required=True)
    stt = st.add_parser("train", help="train a student offline on the games' datasets (runs under torchrun too)")
    add_config_options(stt, "loss=nll size=25%% games=minatar/Breakout", "configs/student/minatar_multitask.toml")
    add_run_options(stt, "runs/student/<run name>")
    stt.set_defaults(func=cmd_student_train)

    std = st.add_parser("drive", help="student-driven distillation online: the student acts, the teacher labels "
                        "every state, any variant of paper B's unified update")
    add_config_options(std, "variant=on_policy_distill+R games=minatar/Breakout", "configs/driven/minatar.toml")
    add_run_options(std, "runs/driven/<run name>")
    std.set_defaults(func=cmd_student_drive)

    sts = st.add_parser("sweep", help="a grid of single-game students (losses, sizes or taus) and its table")
    sts.add_argument("sweep", type=Path, help="sweep TOML, e.g. configs/sweeps/minatar_losses.toml")
    sts.add_argument("overrides", nargs="*", help="sweep overrides key=value (e.g. seeds=0,1)")
    add_no_progress(sts)
    add_wandb(sts)
    sts.set_defaults(func=cmd_student_sweep)
