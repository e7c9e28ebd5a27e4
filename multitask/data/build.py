"""`multitask dataset build`: check everything, open the output, let `recorder` play, one game or many.

Phase 1 checks the game, the teacher, the config and the output before anything is written (a build
that fails before recording anything leaves nothing behind); phase 2 creates or resumes the file
and hands the writer to `recorder.record`. `build_many` builds several games in parallel processes,
one per game: a failing game does not stop the others.
"""

from __future__ import annotations

import dataclasses
import gc
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

import multitask
from multitask import config as configlib
from multitask.agents.checkpoints import Agent, load_teacher
from multitask.data.background import BackgroundWriter
from multitask.data.build_config import DatasetConfig
from multitask.data.control import Control, policy_index, resolve as resolve_control, teacher_entry
from multitask.data.reader import DatasetReader, file_kind, not_a_dataset, root_attrs
from multitask.data.recorder import BuildResult, Observer, record
from multitask.data.verify import verify_invariants
from multitask.data.schema import now_iso, schema_attrs
from multitask.data.writer import DatasetWriter, dataset_exists, remove_dataset
from multitask.envs import GameSpec, get_game
from multitask.errors import UserError
from multitask.files import check_writable
from multitask.jobs import Executor, JobResources, run_jobs


@dataclass(frozen=True)
class BuildJob:
    """One game's build, as `build_many` runs it (in another process: every field pickles)."""

    game_name: str
    teacher_path: Path
    out: Path
    config: DatasetConfig
    resume: bool = False
    overwrite: bool = False
    show_progress: bool = True


def dataset_attrs(game: GameSpec, teacher: Agent, steps: int, policies: list[dict] | None = None) -> dict[str, Any]:
    """The root attributes of a new dataset of `game` labelled by `teacher` (sizes and status: the
    writer's); `policies` default to the teacher's own control."""
    card = teacher.card
    teacher_info = {
        "path": str(teacher.path), "sha256": teacher.sha256, "kind": teacher.kind,
        "source": card.get("source"), "import": card.get("import"),
        "eval_mean": (card.get("eval") or {}).get("mean"), "env_steps": card.get("env_steps"),
        "network": teacher.net.spec.to_dict(),
    }
    return {
        **schema_attrs(),
        "suite": game.suite, "game": game.game, "env_id": game.env_id, "env": json.dumps(game.describe()),
        "action_meanings": json.dumps(list(game.action_meanings)),
        "frame_shape": json.dumps(list(game.frame_shape)), "stack": game.stack, "num_actions": game.num_actions,
        "teacher": json.dumps(teacher_info), "teacher_output_kind": "q_values", "temperature": "none",
        "policies": json.dumps(policies or [teacher_entry(teacher.sha256)]),
        "target_steps": steps, "builds": json.dumps([]),
        "package_version": multitask.__version__, "created": now_iso(),
    }


def _check_output(out: Path, game: GameSpec, teacher: Agent, resume: bool, overwrite: bool) -> None:
    """All checks of the output that must pass before anything is written."""
    if resume and overwrite:
        raise UserError("pass either --resume or --overwrite, not both")
    if resume and out.exists():
        with DatasetReader(out, cache_bytes=0) as d:  # parts present, arrays consistent (not decoding frames)
            attrs, problems = d.info.attrs, verify_invariants(d, decode_frames=False)
        if problems:
            raise UserError(f"cannot resume {out}: it fails verification ({problems[0]}); "
                            f"rebuild it with --overwrite")
        if f"{attrs['suite']}/{attrs['game']}" != game.name:
            raise UserError(f"cannot resume {out}: it holds {attrs['suite']}/{attrs['game']}, not {game.name}")
        sha = json.loads(attrs["teacher"])["sha256"]
        if sha != teacher.sha256:
            raise UserError(f"cannot resume {out} with a different teacher (sha256 {teacher.sha256[:12]} "
                            f"vs {sha[:12]}); use the teacher it was built with, or --overwrite")
    elif not resume:
        if out.is_file():  # --overwrite replaces a dataset (an HDF5 file, damaged or not), nothing else
            try:
                kind = file_kind(out)
            except OSError as e:
                raise UserError(f"cannot read {out} ({e.strerror or e}) to check that it is a dataset; check "
                                f"its permissions or choose another --out") from None
            if kind != "hdf5":
                raise UserError(f"{not_a_dataset(out, kind)}, so no build replaces it, not even with --overwrite; "
                                f"choose another --out, or move the file away first")
        if dataset_exists(out) and not overwrite:
            raise UserError(f"{out} already exists; pass --resume to continue it or --overwrite to replace it")
    check_writable(out, "a writable --out")


def _already_holds(out: Path, game: GameSpec, steps: int) -> BuildResult | None:
    """A resume of a file that already holds `steps` steps or more: nothing to play. A complete file
    is left untouched (its target stays what it holds); an unfinished build is consolidated where it
    stands, complete at the steps it holds (a complete file holds exactly its target). None: there
    is something to add."""
    attrs = root_attrs(out)
    held = int(attrs["num_steps"])
    if held < steps:
        return None
    note = ""
    if attrs.get("status") != "complete" or attrs.get("layout") == "parts":
        writer = DatasetWriter.resume(out, {"target_steps": held})
        writer.finalize()
        note = f"; its unfinished build (target {int(attrs['target_steps']):,}) is now complete at {held:,} steps"
    print(f"{out} already holds {held:,} steps (>= {steps:,}); nothing to add{note}")
    return BuildResult(out, game.name, held, int(attrs["num_episodes"]), 0, 0.0, float("nan"))


def _open_writer(out: Path, game: GameSpec, teacher: Agent, cfg: DatasetConfig, resume: bool,
                 control: Control) -> tuple[DatasetWriter, int]:
    """Continue the dataset at `out` (`resume`: its target becomes cfg.steps, on disk before any
    play, so an interrupted resume says how far it has to go) or create it; with the index of this
    build's control policy in its `policies`."""
    if resume:
        writer = DatasetWriter.resume(out, {"target_steps": cfg.steps})
        policies, index = policy_index(json.loads(writer.attrs["policies"]), control, teacher.sha256)
        writer.attrs["policies"] = json.dumps(policies)
        return writer, index
    policies, index = policy_index([], control, teacher.sha256)
    return DatasetWriter.create(out, dataset_attrs(game, teacher, cfg.steps, policies), cfg.compression_settings()), index


def build_dataset(game_name: str, teacher_path: Path, out: Path, config: DatasetConfig, resume: bool = False,
                  overwrite: bool = False, show_progress: bool = True, observe: Observer | None = None) -> BuildResult:
    """Record `config.steps` steps of the teacher's play into `out` (or continue it to that size)."""
    # ---- Phase 1: check everything, then open the output --------------------------------------
    game = get_game(game_name)
    teacher, _ = load_teacher(teacher_path, game)
    out = Path(out)
    cfg = config.resolved(game)
    control = resolve_control(cfg.control, game)
    _check_output(out, game, teacher, resume, overwrite)
    if overwrite:
        remove_dataset(out)
    resume = resume and out.exists()  # --resume with nothing to resume starts a new dataset
    if resume and (held := _already_holds(out, game, cfg.steps)) is not None:
        return held
    writer, policy = _open_writer(out, game, teacher, cfg, resume, control)
    builds = json.loads(writer.attrs["builds"])
    stream_seed = cfg.seed + 7919 * len(builds)  # each build/resume plays fresh, distinct env streams
    builds.append({"command": configlib.command_line(), "seed": cfg.seed,
                   "env_seeds": [stream_seed, stream_seed + cfg.num_envs - 1], "epsilon": cfg.epsilon,
                   "control": cfg.control, "policy": policy,
                   "num_envs": cfg.num_envs, "lanes": cfg.lanes, "started": now_iso(),
                   "steps_before": writer.num_steps, "config": configlib.to_dict(cfg)})

    # ---- Phase 2: record (recorder.record: play, then cut and consolidate) --------------------
    # The play loop allocates many small containers; without freezing, each full collection walks
    # the ~280k objects that torch and MinAtar's imports leave behind (0.13 s each, 0.4 s per
    # 200k-step MinAtar build; measured). Frozen before the helpers fork, so they inherit it.
    gc.freeze()
    writer = BackgroundWriter.start(writer)  # compression and HDF5 writes overlap the teacher's play
    try:
        return record(game, teacher, writer, cfg, stream_seed, builds, show_progress, observe, control, policy)
    except BaseException:
        writer.close()
        if not resume and writer.durable_steps == 0:
            remove_dataset(out)  # nothing recorded: leave nothing that looks like a dataset
        raise
    finally:
        gc.unfreeze()


def _build_in_worker(job: BuildJob) -> BuildResult:
    torch.set_num_threads(1)
    # Parallel games already use the cores: one lane each, no teacher helper. No bars: they would interleave.
    return build_dataset(job.game_name, job.teacher_path, job.out, dataclasses.replace(job.config, lanes=1),
                         job.resume, job.overwrite, show_progress=False)


def build_many(jobs: Sequence[BuildJob], workers: int, executor: Executor = "processes",
               folder: Path = Path("runs/jobs/datasets"), resources: JobResources = JobResources()) -> list[BuildResult]:
    """One job per game (multitask/jobs.py: local processes, submitit's local executor or Slurm); a
    failing game does not stop the others. Raises after all finished, naming every game that failed."""
    if len(jobs) == 1 and executor == "processes":
        job = jobs[0]
        return [build_dataset(job.game_name, job.teacher_path, job.out, job.config, job.resume, job.overwrite,
                              job.show_progress)]
    return run_jobs(_build_in_worker, jobs, [j.game_name for j in jobs], executor, workers, folder, resources)
