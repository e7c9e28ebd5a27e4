"""`multitask gridworld <study>`: paper B's grid-world findings (training/gridworld_studies.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from multitask.cli.common import add_config_options, add_no_progress
from multitask.training.gridworld_studies import STUDIES

STUDIES_HELP = ("control: teacher- vs student-driven distillation speed; actions: entropy vs expected entropy "
                "regularised at |A| = 4 and 4000; counter: on-policy distill +R cycles where n-distill +R converges, "
                "on an aliased fork")


MDPS_KEY = {"control": "mdps", "actions": "actions_mdps", "counter": "counter_students"}  # what --mdps sets


def cmd_gridworld(args: argparse.Namespace) -> None:
    from multitask import config as configlib
    from multitask.files import check_writable
    from multitask.training.gridworld_studies import StudyConfig, run_study

    overrides = list(args.overrides) + ([f"{MDPS_KEY[args.study]}={args.mdps}"] if args.mdps is not None else [])
    cfg = configlib.load(StudyConfig, args.config, overrides)
    check_writable(args.out / f"{args.study}.json", "a writable --out folder")  # before minutes of study
    report = run_study(args.study, cfg, args.out, show_progress=not args.no_progress)
    size = {"control": f"{cfg.mdps} MDPs", "actions": f"{cfg.actions_mdps} MDPs",
            "counter": f"{cfg.counter_students} students per reward"}[args.study]
    print(f"gridworld {args.study}: {size} in {report['seconds']:.0f} s -> {args.out}/{args.study}.md, .json, .png")


def add_commands(sub) -> None:
    g = sub.add_parser("gridworld", help="paper B's grid-world studies on sampled 20x20 MDPs with tabular students")
    g.add_argument("study", choices=STUDIES, help=STUDIES_HELP)
    add_config_options(g, "train.updates=400 grid.noise=0.2", "study.toml (keys: multitask config gridworld)")
    g.add_argument("--mdps", type=int, help="the study's MDPs: control's mdps (default 32; paper B averaged over "
                   "1,000), actions' actions_mdps (default 8), counter's counter_students (default 8)")
    g.add_argument("--out", type=Path, default=Path("results/gridworld"), help="folder for <study>.json, .md, .png")
    add_no_progress(g)
    g.set_defaults(func=cmd_gridworld)
