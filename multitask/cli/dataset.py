"""`multitask dataset build | info | verify | schema`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from multitask.cli.common import add_no_progress
from multitask.errors import UserError


def cmd_dataset_build(args: argparse.Namespace) -> None:
    from multitask.data.recorder import build_many
    from multitask.data.storage import Compression
    from multitask.envs import get_game

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
    from multitask.data.storage import DatasetReader, disk_bytes

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
    from multitask.agents.checkpoints import load_agent
    from multitask.data.recorder import check_teacher_outputs
    from multitask.data.storage import DatasetReader, verify_invariants

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
    from multitask.data.storage import schema_markdown

    print(schema_markdown())


def add_commands(sub) -> None:
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
    add_no_progress(db)
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
