"""`multitask dataset build | info | verify | schema | manifest`."""

from __future__ import annotations

import argparse
from pathlib import Path

from multitask.cli.common import add_executor, add_no_progress
from multitask.errors import UserError

# --flag -> DatasetConfig key: the flags override the config, their defaults and help come from it
BUILD_FLAGS = {"--steps": "steps", "--epsilon": "epsilon", "--control": "control", "--seed": "seed", "--num-envs": "num_envs",
               "--lanes": "lanes", "--workers": "workers", "--compression": "compression", "--level": "level",
               "--flush-steps": "flush_steps"}
# DatasetConfig key -> the Compression field it sets: a new file's; a resumed one keeps its own
COMPRESSION_KEYS = {"compression": "frames", "level": "level", "frame_chunk": "frame_chunk", "step_chunk": "step_chunk"}


def build_request(args: argparse.Namespace):
    """What `dataset build` was asked for: its games, its key=value overrides and its settings
    (DatasetConfig: defaults <- --config <- overrides <- flags)."""
    from multitask.data.build_config import load_config
    from multitask.envs import get_game

    words = list(args.game or [])  # key=value overrides may stand among the game names
    names = [w for w in words if "=" not in w] + list(args.games or [])
    overrides = [w for w in words if "=" in w] + list(args.overrides)
    if not names:
        raise UserError("name at least one game, e.g. `multitask dataset build minatar/Breakout --steps 100000`")
    games = [get_game(n) for n in names]
    cfg = load_config(args.config, overrides, **{key: getattr(args, key) for key in BUILD_FLAGS.values()})
    return games, overrides, cfg


def cmd_dataset_build(args: argparse.Namespace) -> None:
    from multitask.data.build import BuildJob, build_many
    from multitask.data.schema import dataset_path

    games, overrides, cfg = build_request(args)
    if len(games) > 1 and (args.teacher or args.out):
        raise UserError("--teacher and --out name one game's files; with several games the defaults "
                        "teachers/<suite>/<Game>.pt and datasets/<suite>/<Game>.h5 are used")
    jobs = [BuildJob(g.name, args.teacher or Path("teachers") / g.suite / f"{g.game}.pt",
                     args.out or dataset_path(g), cfg, args.resume, args.overwrite,
                     not args.no_progress) for g in games]
    if args.resume:
        given = _compression_keys_given(args, overrides)
        for job in jobs:
            _check_kept_compression(job.out, cfg, given)
    results = build_many(jobs, cfg.workers, args.executor, args.jobs_dir)
    if len(results) > 1:
        total = sum(r.added_steps for r in results)
        print(f"built {len(results)} datasets, +{total:,} steps")


def _compression_keys_given(args: argparse.Namespace, overrides: list[str]) -> list[str]:
    """The compression keys (COMPRESSION_KEYS) the user set: by flag, override or --config file."""
    from multitask import config as configlib

    given = {k for k in COMPRESSION_KEYS if getattr(args, k, None) is not None}
    given |= {w.split("=", 1)[0].strip() for w in overrides} & COMPRESSION_KEYS.keys()
    if args.config is not None:
        given |= configlib.read_toml(args.config).keys() & COMPRESSION_KEYS.keys()
    return sorted(given)


def _check_kept_compression(out: Path, cfg, given: list[str]) -> None:
    """A resumed dataset keeps its file's compression (data/writer.DatasetWriter.resume): refuse
    compression settings that differ from it rather than ignore them."""
    import json

    from multitask.data.reader import root_attrs

    if not given or not out.exists():  # --resume with nothing to resume starts a new file: settings apply
        return
    kept = json.loads(root_attrs(out)["compression"])
    asked = vars(cfg.compression_settings())
    changed = [k for k in given if kept[COMPRESSION_KEYS[k]] != asked[COMPRESSION_KEYS[k]]]
    if changed:
        raise UserError(f"{out} keeps the compression it was built with ({kept['frames']} frames, level "
                        f"{kept['level']}, chunks {kept['frame_chunk']}/{kept['step_chunk']}), so --resume cannot "
                        f"change {', '.join(changed)}; drop {'it' if len(changed) == 1 else 'them'}, or rebuild "
                        f"with --overwrite instead of --resume")


def cmd_dataset_info(args: argparse.Namespace) -> None:
    import json

    from multitask.data.summary import summarize

    s = summarize(args.file)
    if args.json:
        print(json.dumps(s, indent=2))
        return
    r = (f"return mean {s['return_mean']:.2f}, min {s['return_min']:.1f}, max {s['return_max']:.1f}"
         if s["return_mean"] is not None else "no complete episode")
    per_step = "-" if s["bytes_per_step"] is None else f"{s['bytes_per_step']:.1f}"
    teacher = s["teacher"]
    print(f"{s['file']}: {s['game']}, schema v{s['schema_version']}, {s['status']}")
    print(f"  steps     {s['steps']:,} of {s['target_steps']:,}")
    cut = s["episodes"] - s["complete_episodes"]
    share = f", holding {100 * s['cut_steps'] / s['steps']:.0f}% of the steps" if cut and s["steps"] else ""
    print(f"  episodes  {s['episodes']:,} ({s['complete_episodes']:,} complete, {cut:,} cut by the step budget{share}); {r}")
    print(f"  teacher   {teacher['path']} (sha256 {str(teacher['sha256'])[:12]}, "
          f"{teacher['source']}, eval {teacher['eval_mean']}), outputs: {s['teacher_output_kind']}")
    if s["kl_targets"]:
        k = s["kl_targets"]
        shares = ", ".join(f"{v:.2f} at {tau}" for tau, v in k["top_share_median"].items())
        print(f"  targets   teacher Q: median top-two gap {k['top_two_gap_median']:.4f}; median share of the top "
              f"action in softmax(q / tau): {shares} (uniform {k['uniform_share']:.2f})")
    for c in s["control"]:
        ret = "" if c["return_mean"] is None else f", return mean {c['return_mean']:.2f}"
        print(f"  control   {c['kind']}: {c['episodes']:,} episodes, epsilon {c['epsilon']}{ret}")
    print(f"  size      {s['size_bytes'] / 2**20:.2f} MiB on disk, {per_step} bytes/step "
          f"({s['compression']['frames']} frames)")
    checks = "; ".join(s["problems"]) if s["problems"] else "ok (`dataset verify` also decodes every frame)"
    print(f"  checks    {checks}")


def cmd_dataset_verify(args: argparse.Namespace) -> None:
    from multitask.agents.checkpoints import load_agent
    from multitask.data.reader import DatasetReader
    from multitask.data.verify import check_teacher_outputs, verify_invariants

    if args.sample < 1:
        raise UserError(f"--sample {args.sample} checks no step; pass 1 or more (default 1000)")
    with DatasetReader(args.file) as d:
        problems = verify_invariants(d)
        checked = "structure"
        if args.teacher and not problems:
            problems += check_teacher_outputs(d, load_agent(args.teacher), sample=args.sample)
            checked += (f" and teacher outputs on {min(args.sample, len(d)):,} sampled steps" if len(d) else
                        " and the teacher's identity (no steps: nothing to sample)")
        status = d.info.status
        steps, target = d.info.num_steps, d.info.target_steps
    if problems:
        raise UserError(f"{args.file} failed verification: " + "; ".join(problems))
    note = "" if status == "complete" else f" (build incomplete: {steps:,} of {target:,} steps; continue with --resume)"
    print(f"{args.file}: ok, {steps:,} steps; checked {checked}{note}")


def cmd_dataset_schema(args: argparse.Namespace) -> None:
    from multitask.data.schema import schema_markdown

    print(schema_markdown())


def cmd_dataset_manifest(args: argparse.Namespace) -> None:
    from multitask.data.summary import write_manifest

    print(f"wrote {write_manifest(args.folder)}")


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """The build's flags: default None (the config decides), type, choices and help from the config field."""
    import types
    import typing

    from multitask import config as configlib
    from multitask.data.build_config import DatasetConfig

    hints = typing.get_type_hints(DatasetConfig)
    docs = {key: (default, doc) for key, _, default, doc in configlib.describe(DatasetConfig)}
    for flag, key in BUILD_FLAGS.items():
        tp = hints[key]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):  # `int | None`: the flag takes an int
            tp = next(t for t in typing.get_args(tp) if t is not type(None))
        default, doc = docs[key]
        kind = ({"choices": typing.get_args(tp)} if typing.get_origin(tp) is typing.Literal
                else {"type": _int_flag if tp is int else tp})
        p.add_argument(flag, dest=key, **kind,
                       help=f"{doc} (config key {key}; default {default})".replace("%", "%%"))


def _int_flag(text: str) -> int:
    """An int flag read as the same key's override is (`steps=1e5`): 100000, 100_000 or 1e5."""
    from multitask import config as configlib

    try:
        return configlib.read_value(text, int, "flag", "the command line")
    except UserError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None


def add_commands(sub) -> None:
    d = sub.add_parser("dataset", help="record, inspect and verify teacher datasets").add_subparsers(dest="action", required=True)
    db = d.add_parser("build", help="record a teacher's play into datasets/<suite>/<Game>.h5")
    db.add_argument("game", nargs="*", help="<suite>/<Game>; also config overrides key=value (e.g. epsilon=0.1)")
    db.add_argument("--games", nargs="+", help="several games, built in parallel processes")
    db.add_argument("--config", type=Path, help="TOML file of dataset build settings (`multitask config dataset` lists them)")
    db.add_argument("--teacher", type=Path, help="teacher checkpoint (default: teachers/<suite>/<Game>.pt)")
    db.add_argument("--out", type=Path, help="output file (default: datasets/<suite>/<Game>.h5)")
    db.add_argument("--resume", action="store_true", help="continue the dataset at --out up to --steps (starts one if there is none)")
    db.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    _add_config_flags(db)
    add_executor(db, "runs/jobs/datasets")
    add_no_progress(db)
    db.set_defaults(func=cmd_dataset_build, overrides=[])

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

    dm = d.add_parser("manifest", help="write <folder>/MANIFEST.md: a table of the datasets under the folder")
    dm.add_argument("folder", nargs="?", type=Path, default=Path("datasets"))
    dm.set_defaults(func=cmd_dataset_manifest)
