"""`multitask teacher train | import | manifest`."""

from __future__ import annotations

import argparse
from pathlib import Path

from multitask.cli.common import add_no_progress, add_run_options
from multitask.errors import UserError
from multitask.files import check_writable


def check_new_teacher(out: Path, overwrite: bool) -> None:
    """A teacher checkpoint is written only where none is, or with --overwrite: the committed
    teachers (and a day of Atari training) are one default --out away."""
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give the checkpoint's file path (e.g. {out / 'Game.pt'})")
    if out.exists() and not overwrite:
        raise UserError(f"{out} already holds a teacher; pass --overwrite to replace it, or --out for another path")
    check_writable(out, "a writable --out")


def cmd_teacher_train(args: argparse.Namespace) -> None:
    from multitask.envs import get_game
    from multitask.training.teacher import load_config, train_teacher

    game = get_game(args.game)
    cfg = load_config(game.suite, args.config, args.overrides)
    out = args.out or Path("teachers") / game.suite / f"{game.game}.pt"
    run_dir = args.run_dir or Path("runs") / "teacher" / game.suite / game.game
    check_new_teacher(out, args.overwrite)
    train_teacher(game.name, cfg, out, run_dir, wandb_mode=args.wandb, restart=args.restart,
                  show_progress=not args.no_progress)


def cmd_teacher_import(args: argparse.Namespace) -> None:
    from multitask.agents.importers import import_teacher
    from multitask.envs import get_game

    if args.episodes < 0:
        raise UserError(f"--episodes {args.episodes} is negative; pass 0 (no evaluation, the default) or more")
    game = get_game(args.game)
    if game.suite != "atari":
        raise UserError(f"teacher import converts Atari DQN checkpoints; {game.name} is not an Atari game")
    out = args.out or Path("teachers") / game.suite / f"{game.game}.pt"
    check_new_teacher(out, args.overwrite)
    import_teacher(args.format, args.file, game, out, evaluate_episodes=args.episodes,
                   show_progress=not args.no_progress)


def cmd_teacher_manifest(args: argparse.Namespace) -> None:
    from multitask.evaluation.protocol import EVAL_EPSILON
    from multitask.evaluation.report import MINATAR_TEACHER_TARGETS, teacher_manifest
    from multitask.files import atomic_write_text

    folder = Path(args.folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder of teacher checkpoints")
    table = teacher_manifest(folder, MINATAR_TEACHER_TARGETS)
    header = (f"# Teachers in {folder}\n\nMade by `multitask teacher manifest {folder}` from the cards "
              f"(`<Game>.json`) written by `multitask teacher train` or `teacher import`. Scores: the one evaluation protocol "
              f"(epsilon {EVAL_EPSILON}, whole games, raw score), fresh seeds, best periodic snapshot or last weights "
              f"as the `weights` column says.\n\n")
    notes = folder / "NOTES.md"
    extra = "\n\n" + notes.read_text() if notes.exists() else ""
    atomic_write_text(folder / "MANIFEST.md", header + table + extra + "\n")
    print(f"wrote {folder / 'MANIFEST.md'}")


def add_commands(sub) -> None:
    t = sub.add_parser("teacher", help="train or import DQN teachers").add_subparsers(dest="action", required=True)
    tt = t.add_parser("train", help="train a DQN teacher for one game (a killed run resumes)")
    tt.add_argument("game", help="<suite>/<Game>, e.g. minatar/Breakout or atari/Pong")
    tt.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. total_steps=500000 dqn.lr=3e-4)")
    tt.add_argument("--config", type=Path, help="TOML config (default: configs/teacher/<suite>.toml)")
    tt.add_argument("--out", type=Path, help="teacher checkpoint (default: teachers/<suite>/<Game>.pt)")
    tt.add_argument("--overwrite", action="store_true", help="replace an existing teacher at --out")
    add_run_options(tt, "runs/teacher/<suite>/<Game>")
    tt.set_defaults(func=cmd_teacher_train)

    ti = t.add_parser("import", help="convert a CleanRL or Stable-Baselines3 Atari DQN into a teacher")
    ti.add_argument("format", choices=("cleanrl", "sb3"), help="cleanrl: dqn_atari.cleanrl_model state_dict; sb3: RL Zoo dqn-*.zip")
    ti.add_argument("file", type=Path)
    ti.add_argument("--game", required=True, help="the Atari game it was trained on, e.g. atari/Pong")
    ti.add_argument("--out", type=Path, help="teacher checkpoint (default: teachers/atari/<Game>.pt)")
    ti.add_argument("--overwrite", action="store_true", help="replace an existing teacher at --out")
    ti.add_argument("--episodes", type=int, default=0, help="evaluate the imported teacher for the card (default: 0, skip)")
    add_no_progress(ti)
    ti.set_defaults(func=cmd_teacher_import)

    tm = t.add_parser("manifest", help="write <folder>/MANIFEST.md from the teacher cards")
    tm.add_argument("folder", nargs="?", default="teachers/minatar")
    tm.set_defaults(func=cmd_teacher_manifest)
