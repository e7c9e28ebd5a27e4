"""The `multitask` command: one subcommand per stage of the pipeline.

Every user mistake surfaces as a `UserError`, printed as one sentence with exit code 2 and no
traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from multitask import __version__
from multitask.errors import UserError


def _add_wandb(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wandb", choices=("off", "offline", "online"), default="offline",
                   help="Weights & Biases tracking: offline (default; no account or network), online, off")


# ---- multitask games -------------------------------------------------------------------------

def cmd_games(args: argparse.Namespace) -> None:
    from multitask.envs import SUITES, get_game, known_games

    for suite in [args.suite] if args.suite else SUITES:
        for name in known_games(suite):
            if suite == "minatar" or args.actions:
                spec = get_game(name)
                print(f"{name:28s} {spec.num_actions:2d} actions  obs {spec.obs_shape}  "
                      f"{' '.join(spec.action_meanings) if args.actions else ''}")
            else:
                print(name)


# ---- multitask config ------------------------------------------------------------------------

def cmd_config(args: argparse.Namespace) -> None:
    from multitask import config as configlib

    cls = _config_class(args.what)
    for key, tp, default, doc in configlib.describe(cls):
        print(f"{key:28s} {tp:10s} {default!r:>14}  {doc}")


def _config_class(what: str):
    if what == "teacher":
        from multitask.teacher import TeacherConfig
        return TeacherConfig
    if what == "student":
        from multitask.student import StudentConfig
        return StudentConfig
    raise UserError(f"no config named {what}")


# ---- multitask teacher ... -------------------------------------------------------------------

def cmd_teacher_train(args: argparse.Namespace) -> None:
    from multitask.envs import get_game
    from multitask.teacher import load_config, train_teacher

    game = get_game(args.game)
    cfg = load_config(game.suite, args.config, args.overrides)
    out = args.out or Path("teachers") / game.suite / f"{game.game}.pt"
    run_dir = args.run_dir or Path("runs") / "teacher" / game.suite / game.game
    _check_writable(out)
    train_teacher(game.name, cfg, out, run_dir, wandb_mode=args.wandb, restart=args.restart,
                  show_progress=not args.no_progress)


def cmd_teacher_import(args: argparse.Namespace) -> None:
    from multitask.envs import get_game
    from multitask.importers import import_teacher

    game = get_game(args.game)
    if game.suite != "atari":
        raise UserError(f"teacher import converts Atari DQN checkpoints; {game.name} is not an Atari game")
    out = args.out or Path("teachers") / game.suite / f"{game.game}.pt"
    _check_writable(out)
    import_teacher(args.format, args.file, game, out, evaluate_episodes=args.episodes)


def cmd_teacher_manifest(args: argparse.Namespace) -> None:
    from multitask.checkpoints import atomic_write_text
    from multitask.report import MINATAR_TEACHER_TARGETS, teacher_manifest

    folder = Path(args.folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder of teacher checkpoints")
    table = teacher_manifest(folder, MINATAR_TEACHER_TARGETS)
    header = (f"# Teachers in {folder}\n\nMade by `multitask teacher manifest {folder}` from the cards "
              f"(`<Game>.json`) written by `multitask teacher train`. Scores: the one evaluation protocol "
              f"(epsilon 0.05, whole games, raw score), fresh seeds, best periodic snapshot or last weights "
              f"as the `weights` column says.\n\n")
    notes = folder / "NOTES.md"
    extra = "\n\n" + notes.read_text() if notes.exists() else ""
    atomic_write_text(folder / "MANIFEST.md", header + table + extra + "\n")
    print(f"wrote {folder / 'MANIFEST.md'}")


# ---- multitask evaluate ----------------------------------------------------------------------

def cmd_evaluate(args: argparse.Namespace) -> None:
    from multitask.checkpoints import check_agent_game, load_agent
    from multitask.envs import get_game
    from multitask.evaluation import evaluate_games

    agent = load_agent(args.checkpoint)
    games = args.games or list(agent.net.games)
    for g in games:
        check_agent_game(agent, get_game(g))
    if args.out:
        _check_writable(args.out)
    results = evaluate_games(agent.net, games, args.episodes, args.seed, epsilon=args.epsilon,
                             workers=args.workers, show_progress=not args.no_progress)
    report = {
        "agent": {"checkpoint": str(agent.path), "sha256": agent.sha256, "kind": agent.kind,
                  "games": list(agent.net.games)},
        "package_version": __version__, "seed": args.seed, "episodes": args.episodes,
        "games": {g: r.to_dict() for g, r in results.items()},
    }
    if args.out:
        from multitask.checkpoints import atomic_write_text
        atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    for g, r in results.items():
        print(f"{g:28s} {r.mean:10.2f} +/- {np.std(r.returns):.2f}  ({len(r.returns)} episodes, "
              f"mean length {np.mean(r.lengths):.0f})")
    print(f"evaluated {agent.kind} {agent.path} on {len(results)} game(s)"
          + (f" -> {args.out}" if args.out else ""))


# ---- multitask dataset ... -------------------------------------------------------------------

def cmd_dataset_build(args: argparse.Namespace) -> None:
    from multitask.envs import get_game
    from multitask.recorder import build_many
    from multitask.storage import Compression

    names = list(args.game or []) + list(args.games or [])
    if not names:
        raise UserError("name at least one game, e.g. `multitask dataset build minatar/Breakout --steps 100000`")
    games = [get_game(n) for n in names]
    if len(games) > 1 and (args.teacher or args.out):
        raise UserError("--teacher and --out name one game's files; with several games the defaults "
                        "teachers/<suite>/<Game>.pt and datasets/<suite>/<Game>.h5 are used")
    jobs = []
    for g in games:
        jobs.append(dict(
            game_name=g.name, steps=args.steps, epsilon=args.epsilon, seed=args.seed, num_envs=args.num_envs,
            lanes=args.lanes,
            teacher_path=args.teacher or Path("teachers") / g.suite / f"{g.game}.pt",
            out=args.out or Path("datasets") / g.suite / f"{g.game}.h5",
            resume=args.resume, overwrite=args.overwrite, show_progress=not args.no_progress,
            flush_steps=args.flush_steps,
            compression=Compression(frames=args.compression, level=args.level)))
    results = build_many(jobs, args.workers)
    if len(results) > 1:
        total = sum(r.added_steps for r in results)
        print(f"built {len(results)} datasets, +{total:,} steps")


def cmd_dataset_info(args: argparse.Namespace) -> None:
    from multitask.storage import DatasetReader, disk_bytes

    with DatasetReader(args.file) as d:
        info, e = d.info, d.episodes
        complete = e["complete"]
        ret = e["return"][complete]
        size = disk_bytes(args.file)
        summary = {
            "file": str(args.file), "game": info.game, "status": info.status,
            "schema_version": int(info.attrs["schema_version"]),
            "steps": info.num_steps, "target_steps": info.target_steps,
            "episodes": info.num_episodes, "complete_episodes": int(complete.sum()),
            "return_mean": float(ret.mean()) if len(ret) else None,
            "return_min": float(ret.min()) if len(ret) else None,
            "return_max": float(ret.max()) if len(ret) else None,
            "teacher": {k: info.teacher.get(k) for k in ("path", "sha256", "source", "eval_mean")},
            "teacher_output_kind": info.attrs["teacher_output_kind"],
            "control": [{**p, "episodes": int((e["policy"] == i).sum()),
                         "epsilon": sorted(set(np.round(e["epsilon"][e["policy"] == i].astype(float), 4).tolist()))}
                        for i, p in enumerate(info.policies)],
            "size_bytes": size, "bytes_per_step": size / max(1, info.num_steps),
            "compression": json.loads(info.attrs["compression"]),
        }
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    r = (f"return mean {summary['return_mean']:.2f}, min {summary['return_min']:.1f}, max {summary['return_max']:.1f}"
         if summary["return_mean"] is not None else "no complete episode")
    print(f"{summary['file']}: {info.game}, schema v{summary['schema_version']}, {info.status}")
    print(f"  steps     {info.num_steps:,} of {info.target_steps:,}")
    print(f"  episodes  {info.num_episodes:,} ({summary['complete_episodes']:,} complete); {r}")
    print(f"  teacher   {summary['teacher']['path']} (sha256 {str(summary['teacher']['sha256'])[:12]}, "
          f"{summary['teacher']['source']}, eval {summary['teacher']['eval_mean']}), outputs: {summary['teacher_output_kind']}")
    for c in summary["control"]:
        print(f"  control   {c['kind']}: {c['episodes']:,} episodes, epsilon {c['epsilon']}")
    print(f"  size      {size / 2**20:.2f} MiB on disk, {summary['bytes_per_step']:.1f} bytes/step "
          f"({summary['compression']['frames']} frames)")


def cmd_dataset_verify(args: argparse.Namespace) -> None:
    from multitask.checkpoints import load_agent
    from multitask.recorder import check_teacher_outputs
    from multitask.storage import DatasetReader, verify_invariants

    with DatasetReader(args.file) as d:
        problems = verify_invariants(d)
        checked = "structure"
        if args.teacher and not problems:
            problems += check_teacher_outputs(d, load_agent(args.teacher), sample=args.sample)
            checked += f" and teacher outputs on {min(args.sample, len(d)):,} sampled steps"
        status = d.info.status
        steps, target = d.info.num_steps, d.info.target_steps
    if problems:
        raise UserError(f"{args.file} failed verification: " + "; ".join(problems))
    note = "" if status == "complete" else f" (build incomplete: {steps:,} of {target:,} steps; continue with --resume)"
    print(f"{args.file}: ok, {steps:,} steps; checked {checked}{note}")


def cmd_dataset_schema(args: argparse.Namespace) -> None:
    from multitask.storage import schema_markdown

    print(schema_markdown())


# ---- multitask student ... -------------------------------------------------------------------

def cmd_student_train(args: argparse.Namespace) -> None:
    from multitask import config as configlib
    from multitask.student import StudentConfig, train_student

    if args.config is None and not args.overrides:
        raise UserError("give a config (--config configs/<name>.toml) or at least games=...")
    cfg = configlib.load(StudentConfig, args.config, args.overrides)
    train_student(cfg, run_dir=args.run_dir, wandb_mode=args.wandb, restart=args.restart,
                  show_progress=not args.no_progress)


def cmd_student_sweep(args: argparse.Namespace) -> None:
    from multitask.sweep import run_sweep

    run_sweep(args.sweep, args.overrides, args.wandb, show_progress=not args.no_progress)


def cmd_report(args: argparse.Namespace) -> None:
    from multitask.report import load_summary, run_table

    for path in args.summaries:
        if not Path(path).is_file():
            raise UserError(f"{path} does not exist; pass a run's summary.json")
        try:
            summary = load_summary(path)
            print(f"{summary['run']}:\n{run_table(summary)}\n")
        except (ValueError, KeyError):
            raise UserError(f"{path} is not a student run summary (summary.json)") from None


def _check_writable(path: Path) -> None:
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = parent / f".{path.name}.probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror}); choose a writable location") from None


# ---- parser ----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="multitask", description="Multi-task policy distillation: "
                                "teachers, datasets, students, evaluation.")
    p.add_argument("--version", action="version", version=f"multitask {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("games", help="list the known games (<suite>/<Game>)")
    g.add_argument("--suite", choices=("atari", "minatar"))
    g.add_argument("--actions", action="store_true", help="also print each game's legal actions")
    g.set_defaults(func=cmd_games)

    c = sub.add_parser("config", help="list a config's keys, defaults and their sources")
    c.add_argument("what", choices=("teacher", "student"))
    c.set_defaults(func=cmd_config)

    t = sub.add_parser("teacher", help="train or import DQN teachers").add_subparsers(dest="action", required=True)
    tt = t.add_parser("train", help="train a DQN teacher for one game (a killed run resumes)")
    tt.add_argument("game", help="<suite>/<Game>, e.g. minatar/Breakout or atari/Pong")
    tt.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. total_steps=500000 dqn.lr=3e-4)")
    tt.add_argument("--config", type=Path, help="TOML config (default: configs/teacher/<suite>.toml)")
    tt.add_argument("--out", type=Path, help="teacher checkpoint (default: teachers/<suite>/<Game>.pt)")
    tt.add_argument("--run-dir", type=Path, help="training state, metrics, W&B files (default: runs/teacher/<suite>/<Game>)")
    tt.add_argument("--restart", action="store_true", help="discard a previous run's checkpoint instead of resuming it")
    tt.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_wandb(tt)
    tt.set_defaults(func=cmd_teacher_train)

    ti = t.add_parser("import", help="convert a CleanRL or Stable-Baselines3 Atari DQN into a teacher")
    ti.add_argument("format", choices=("cleanrl", "sb3"), help="cleanrl: dqn_atari.cleanrl_model state_dict; sb3: RL Zoo dqn-*.zip")
    ti.add_argument("file", type=Path)
    ti.add_argument("--game", required=True, help="the Atari game it was trained on, e.g. atari/Pong")
    ti.add_argument("--out", type=Path, help="teacher checkpoint (default: teachers/atari/<Game>.pt)")
    ti.add_argument("--episodes", type=int, default=0, help="evaluate the imported teacher for the card (default: 0, skip)")
    ti.set_defaults(func=cmd_teacher_import)

    d = sub.add_parser("dataset", help="record, inspect and verify teacher datasets").add_subparsers(dest="action", required=True)
    db = d.add_parser("build", help="record a teacher's play into datasets/<suite>/<Game>.h5")
    db.add_argument("game", nargs="*", help="<suite>/<Game>")
    db.add_argument("--games", nargs="+", help="several games, built in parallel processes")
    db.add_argument("--teacher", type=Path, help="teacher checkpoint (default: teachers/<suite>/<Game>.pt)")
    db.add_argument("--steps", type=int, required=True, help="total steps the dataset must hold")
    db.add_argument("--epsilon", type=float, default=0.05, help="teacher's epsilon-greedy (default 0.05, Rusu et al. 2016)")
    db.add_argument("--out", type=Path, help="output file (default: datasets/<suite>/<Game>.h5)")
    db.add_argument("--seed", type=int, default=0, help="env streams are seeded seed + i (+7919 per resume)")
    db.add_argument("--num-envs", type=int, help="parallel envs in all lanes (default: 32 Atari, 256 MinAtar)")
    db.add_argument("--lanes", type=int, default=2, help="env groups, each played by the teacher in its own "
                    "process, about one per core (default 2; 1 plays in this process alone; games built in "
                    "parallel with --games use one lane each)")
    db.add_argument("--resume", action="store_true", help="continue the dataset at --out up to --steps (starts one if there is none)")
    db.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    db.add_argument("--workers", type=int, default=2, help="processes for --games (default 2)")
    db.add_argument("--compression", choices=("gzip", "lzf", "none"), default="gzip", help="frame compression (default gzip)")
    db.add_argument("--level", type=int, default=1, help="gzip level for frames (default 1)")
    db.add_argument("--flush-steps", type=int, help="completed steps buffered before a flush to disk (default: ~32 MiB of steps, "
                    "about 75,000 MinAtar or 4,700 Atari steps; also flushed every 60 s)")
    db.add_argument("--no-progress", action="store_true")
    db.set_defaults(func=cmd_dataset_build)
    di = d.add_parser("info", help="steps, episodes, returns, teacher, control, size")
    di.add_argument("file", type=Path)
    di.add_argument("--json", action="store_true")
    di.set_defaults(func=cmd_dataset_info)
    dv = d.add_parser("verify", help="check every invariant (and, given the teacher, its outputs)")
    dv.add_argument("file", type=Path)
    dv.add_argument("--teacher", type=Path, help="recompute teacher outputs on a sample and compare")
    dv.add_argument("--sample", type=int, default=1000, help="steps sampled for the teacher check")
    dv.set_defaults(func=cmd_dataset_verify)
    ds = d.add_parser("schema", help="print the HDF5 schema as Markdown tables")
    ds.set_defaults(func=cmd_dataset_schema)

    st = sub.add_parser("student", help="distil teachers' datasets into one multi-head student").add_subparsers(dest="action", required=True)
    stt = st.add_parser("train", help="train a student offline on the games' datasets (runs under torchrun too)")
    stt.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. loss=nll size=25%% games=minatar/Breakout)")
    stt.add_argument("--config", type=Path, help="TOML config, e.g. configs/minatar_multitask.toml")
    stt.add_argument("--run-dir", type=Path, help="default: runs/student/<run name>")
    stt.add_argument("--restart", action="store_true", help="discard a previous run's checkpoint instead of resuming it")
    stt.add_argument("--no-progress", action="store_true")
    _add_wandb(stt)
    stt.set_defaults(func=cmd_student_train)

    sts = st.add_parser("sweep", help="a grid of single-game students (losses or sizes) and its table")
    sts.add_argument("sweep", type=Path, help="sweep TOML, e.g. configs/sweeps/minatar_losses.toml")
    sts.add_argument("overrides", nargs="*", help="sweep overrides key=value (e.g. seeds=0,1)")
    sts.add_argument("--no-progress", action="store_true")
    _add_wandb(sts)
    sts.set_defaults(func=cmd_student_sweep)

    r = sub.add_parser("report", help="per-game table (teacher, student, % of teacher, geometric mean) of student runs")
    r.add_argument("summaries", nargs="+", type=Path, help="runs/student/<run>/summary.json")
    r.set_defaults(func=cmd_report)

    tm = t.add_parser("manifest", help="write <folder>/MANIFEST.md from the teacher cards")
    tm.add_argument("folder", nargs="?", default="teachers/minatar")
    tm.set_defaults(func=cmd_teacher_manifest)

    e = sub.add_parser("evaluate", help="score any agent checkpoint with the one evaluation protocol")
    e.add_argument("checkpoint", type=Path)
    e.add_argument("--games", nargs="+", help="games to evaluate (default: every game the agent plays)")
    e.add_argument("--episodes", type=int, default=20, help="whole games per game (default 20)")
    e.add_argument("--seed", type=int, default=12345, help="env i uses seed + i; actions use their own stream")
    e.add_argument("--epsilon", type=float, default=0.05, help="epsilon-greedy evaluation (protocol: 0.05)")
    e.add_argument("--workers", type=int, default=2, help="processes evaluating games in parallel")
    e.add_argument("--out", type=Path, help="write per-episode returns, lengths, protocol and seeds as JSON")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=cmd_evaluate)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come after flags (`train G --config c.toml lr=1e-3 --no-progress`); argparse
    # stops filling a nargs="*" positional at the first flag, so leftover key=value words join it.
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        args.func(args)
    except UserError as e:
        print(f"multitask: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("multitask: interrupted", file=sys.stderr)
        return 130
    return 0
