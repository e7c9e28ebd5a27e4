"""`multitask dataset build`: a teacher plays, every step goes into the game's HDF5 dataset.

The teacher acts epsilon-greedily (0.05, Rusu et al. 2016) over a vector env with one batched
forward pass per vector step; its raw outputs for the observation it acted on are stored with the
step. Per vector step the loop only appends whole arrays to a time log; an env's episode is cut out
of the log when it ends, so bookkeeping costs O(1) numpy calls per vector step whatever the number
of envs. Completed episodes are flushed to disk (see `storage` for the crash-safety protocol); a
build stops at exactly `steps` steps by cutting the episodes still running at the end (stored with
complete = false).
"""

from __future__ import annotations

import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

import multitask
from multitask import config as configlib
from multitask.checkpoints import Agent, load_teacher
from multitask.dqn import epsilon_greedy
from multitask.envs import GameSpec, get_game, make_vector_env
from multitask.errors import UserError
from multitask.framestack import newest_frame, split_frames
from multitask.progress import Progress
from multitask.storage import (BackgroundWriter, Compression, DatasetWriter, Episode, _check_schema, _open_h5,
                               dataset_exists, now_iso, remove_dataset)

DEFAULT_EPSILON = 0.05  # Rusu et al. 2016: the teacher plays epsilon-greedy with 0.05
# MinAtar: 128 envs amortise the per-vector-step Python work (200k Breakout steps on one core:
# 6.9 s with 32 envs, 5.0 s with 128; measured)
DEFAULT_NUM_ENVS = {"atari": 8, "minatar": 128}

# observe(obs, env_seed, env_episode, step_in_episode): sees every observation the teacher acts on
Observer = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], None]


@dataclass
class BuildResult:
    path: Path
    game: str
    steps: int
    episodes: int
    added_steps: int
    seconds: float
    mean_return: float


class _TimeLog:
    """Per-vector-step arrays, kept until every episode using them has been cut out.

    One preallocated array per field, indexed [vector step - base, env], so cutting an episode out
    is one slice per field (stacking per-step rows was a fifth of MinAtar recording time, measured
    with cProfile); rows before the oldest running episode are dropped when the arrays fill up.
    """

    def __init__(self, capacity: int = 1024):
        self.base = 0  # vector step of row 0
        self.rows = 0
        self.keep_from = 0
        self.capacity = capacity
        self.fields: list[np.ndarray] = []  # (q, action, reward, terminated, truncated, life_lost, next_frame)

    def append(self, entry: tuple) -> None:
        if not self.fields:
            self.fields = [np.empty((self.capacity, *np.shape(x)), np.asarray(x).dtype) for x in entry]
        if self.rows == self.capacity:
            self._make_room()
        for buf, x in zip(self.fields, entry):
            buf[self.rows] = x
        self.rows += 1

    def column(self, env: int, start: int, stop: int, field: int) -> np.ndarray:
        return self.fields[field][start - self.base:stop - self.base, env].copy()

    def prune(self, keep_from: int) -> None:
        self.keep_from = keep_from

    def _make_room(self) -> None:
        drop = self.keep_from - self.base
        keep = self.rows - drop
        if keep > self.capacity // 2:  # mostly still needed: grow instead of shifting every time
            self.capacity *= 2
            grown = [np.empty((self.capacity, *b.shape[1:]), b.dtype) for b in self.fields]
            for g, b in zip(grown, self.fields):
                g[:keep] = b[drop:self.rows]
            self.fields = grown
        else:
            for b in self.fields:
                b[:keep] = b[drop:self.rows]
        self.base, self.rows = self.keep_from, keep


def _cut(log: _TimeLog, env: int, start: int, stop: int, start_frames: np.ndarray, complete: bool,
         epsilon: float, env_seed: int, env_episode: int) -> Episode:
    """The episode of `env` made of vector steps [start, stop)."""
    q, act, rew, term, trunc, life, nxt = (log.column(env, start, stop, k) for k in range(7))
    if not complete:
        trunc[-1] = True  # cut by the step budget (column() returned a copy)
    return Episode(frames=np.concatenate([start_frames, nxt]), teacher_outputs=q.astype(np.float32, copy=False),
                   action=act, reward=rew.astype(np.float32, copy=False), terminated=term, truncated=trunc,
                   life_lost=life, complete=complete, policy=0, epsilon=epsilon,
                   env_seed=env_seed, env_episode=env_episode)


def _check_output(out: Path, game: GameSpec, teacher: Agent, resume: bool, overwrite: bool) -> None:
    """All checks that must pass before anything is written."""
    if resume and overwrite:
        raise UserError("pass either --resume or --overwrite, not both")
    if resume and Path(out).exists():
        with _open_h5(out) as f:
            _check_schema(f, out)
            if f"{f.attrs['suite']}/{f.attrs['game']}" != game.name:
                raise UserError(f"cannot resume {out}: it holds {f.attrs['suite']}/{f.attrs['game']}, not {game.name}")
            sha = json.loads(f.attrs["teacher"])["sha256"]
            if sha != teacher.sha256:
                raise UserError(f"cannot resume {out} with a different teacher (sha256 {teacher.sha256[:12]} "
                                f"vs {sha[:12]}); use the teacher it was built with, or --overwrite")
    elif not resume and dataset_exists(out) and not overwrite:
        raise UserError(f"{out} already exists; pass --resume to continue it or --overwrite to replace it")
    try:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        probe = Path(out).with_name(f".{Path(out).name}.probe")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write {out} ({e.strerror}); choose a writable --out") from None


def _root_attrs(game: GameSpec, teacher: Agent, steps: int) -> dict:
    card = teacher.card
    teacher_info = {
        "path": str(teacher.path), "sha256": teacher.sha256, "kind": teacher.kind,
        "source": card.get("source"), "import": card.get("import"),
        "eval_mean": (card.get("eval") or {}).get("mean"), "env_steps": card.get("env_steps"),
        "network": teacher.net.spec.to_dict(),
    }
    return {
        "schema": "multitask-teacher-dataset", "schema_version": 1,
        "suite": game.suite, "game": game.game, "env_id": game.env_id, "env": json.dumps(game.describe()),
        "action_meanings": json.dumps(list(game.action_meanings)),
        "frame_shape": json.dumps(list(game.frame_shape)), "stack": game.stack, "num_actions": game.num_actions,
        "teacher": json.dumps(teacher_info), "teacher_output_kind": "q_values", "temperature": "none",
        "policies": json.dumps([{"kind": "teacher", "sha256": teacher.sha256,
                                 "action_selection": "epsilon-greedy on teacher outputs"}]),
        "target_steps": steps, "builds": json.dumps([]),
        "package_version": multitask.__version__, "created": now_iso(),
    }


def build_dataset(game_name: str, teacher_path: Path, steps: int, out: Path, epsilon: float = DEFAULT_EPSILON,
                  seed: int = 0, num_envs: int | None = None, resume: bool = False, overwrite: bool = False,
                  flush_steps: int = 20_000, flush_seconds: float = 60.0, compression: Compression | None = None,
                  show_progress: bool = True, observe: Observer | None = None) -> BuildResult:
    # ---- Phase 1: check everything, then open the output --------------------------------------
    game = get_game(game_name)
    teacher, _ = load_teacher(teacher_path, game)
    out = Path(out)
    if steps < 1:
        raise UserError("--steps must be positive")
    if not 0.0 <= epsilon <= 1.0:
        raise UserError("--epsilon must be in [0, 1]")
    _check_output(out, game, teacher, resume, overwrite)
    if overwrite:
        remove_dataset(out)
    resume = resume and out.exists()  # --resume with nothing to resume starts a new dataset
    created_here = not resume
    if resume:
        writer = DatasetWriter.resume(out)
        writer.attrs["target_steps"] = steps
        if writer.num_steps >= steps:
            writer.finalize()
            print(f"{out} already holds {writer.num_steps:,} steps (>= {steps:,}); nothing to add")
            return BuildResult(out, game.name, writer.num_steps, writer.num_episodes, 0, 0.0, float("nan"))
    else:
        writer = DatasetWriter.create(out, _root_attrs(game, teacher, steps), compression or Compression())
    builds = json.loads(writer.attrs["builds"])
    n = num_envs or DEFAULT_NUM_ENVS[game.suite]
    stream_seed = seed + 7919 * len(builds)  # each build/resume plays fresh, distinct env streams
    builds.append({"command": configlib.command_line(), "seed": seed, "env_seeds": [stream_seed, stream_seed + n - 1],
                   "epsilon": epsilon, "num_envs": n, "started": now_iso(), "steps_before": writer.num_steps})

    writer = BackgroundWriter.start(writer)  # compression and HDF5 writes overlap the teacher's play
    try:
        return _record(game, teacher, writer, steps, epsilon, n, stream_seed, builds, flush_steps,
                       flush_seconds, show_progress, observe)
    except BaseException:
        writer.close()
        if created_here and writer.durable_steps == 0:
            remove_dataset(out)  # nothing recorded: leave nothing that looks like a dataset
        raise


def _record(game: GameSpec, teacher: Agent, writer: DatasetWriter | BackgroundWriter, steps: int, epsilon: float,
            n: int, stream_seed: int, builds: list, flush_steps: int, flush_seconds: float, show_progress: bool,
            observe: Observer | None) -> BuildResult:
    # ---- Phase 2: play ---------------------------------------------------------------------------
    net, head = teacher.net, teacher.net.head_index(game.name)
    c = game.frame_shape[0]
    env = make_vector_env(game, n)
    rng = np.random.default_rng(stream_seed + 1_000_003)
    obs = env.reset(stream_seed)
    env_seeds = stream_seed + np.arange(n)
    log = _TimeLog()
    start = np.zeros(n, dtype=np.int64)  # vector step at which each env's episode began
    start_frames = [split_frames(obs[i], c) for i in range(n)]  # pads + s_0 of each running episode
    env_episode = np.zeros(n, dtype=np.int64)
    pending: list[Episode] = []
    pending_steps, t, before = 0, 0, writer.num_steps
    last_flush = time.perf_counter()
    t0 = time.perf_counter()
    returns: list[float] = []
    bar = Progress(steps, f"dataset {game.name}", initial=before, enabled=show_progress)

    def flush(final: bool = False) -> None:
        nonlocal pending, pending_steps, last_flush
        builds[-1]["steps_after"] = writer.num_steps + pending_steps
        builds[-1]["finished" if final else "updated"] = now_iso()
        writer.flush(pending, {"builds": json.dumps(builds)})
        pending, pending_steps, last_flush = [], 0, time.perf_counter()

    while True:
        if observe is not None:
            observe(obs, env_seeds, env_episode, t - start)
        with torch.inference_mode():
            q = net(torch.from_numpy(obs), head)
        actions = epsilon_greedy(q, epsilon, rng)
        step = env.step(actions)
        log.append((q.numpy(), actions, step.reward, step.terminated, step.truncated, step.life_lost,
                    newest_frame(step.next_obs, c)))
        t += 1
        for i in np.flatnonzero(step.done):
            ep = _cut(log, i, start[i], t, start_frames[i], True, epsilon, env_seeds[i], env_episode[i])
            pending.append(ep)
            pending_steps += ep.length
            returns.append(float(ep.reward.sum()))
            start[i], env_episode[i] = t, env_episode[i] + 1
            start_frames[i] = split_frames(step.obs[i], c)
        log.prune(int(start.min()))
        obs = step.obs
        bar.update(n, postfix=f"return {np.mean(returns[-20:]) if returns else float('nan'):.1f}")
        if writer.num_steps + pending_steps + int((t - start).sum()) >= steps:
            break  # before any flush: the last vector step's episodes must stay cuttable
        if pending_steps >= flush_steps or (pending and time.perf_counter() - last_flush > flush_seconds):
            flush()
    env.close()

    # ---- Phase 3: cut the running episodes to land on exactly `steps`, flush, consolidate --------
    excess = writer.num_steps + pending_steps + int((t - start).sum()) - steps
    running = [(i, int(t - start[i])) for i in range(n)]
    for k in range(n - 1, -1, -1):  # trim running episodes from the last env backwards
        i, length = running[k]
        cut = min(excess, length)
        running[k] = (i, length - cut)
        excess -= cut
    while excess > 0:  # every env had just reset: shorten the newest completed episode instead
        ep = pending.pop()
        keep = ep.length - excess
        excess = max(0, -keep)
        if keep > 0:
            pending.append(_shorten(ep, keep))
    pending_steps = sum(e.length for e in pending)
    for i, length in running:
        if length > 0:
            ep = _cut(log, i, start[i], start[i] + length, start_frames[i], False, epsilon, env_seeds[i], env_episode[i])
            pending.append(ep)
            pending_steps += ep.length
    bar.n = writer.num_steps + pending_steps
    bar.close()
    flush(final=True)
    writer.finalize()
    seconds = time.perf_counter() - t0
    added = writer.num_steps - before
    mean_return = float(np.mean(returns)) if returns else float("nan")
    print(f"dataset {game.name}: {writer.num_steps:,} steps, {writer.num_episodes:,} episodes "
          f"(+{added:,} steps in {seconds:.0f}s, {added / max(seconds, 1e-9):,.0f} steps/s, "
          f"mean return {mean_return:.1f}) -> {writer.path}")
    return BuildResult(writer.path, game.name, writer.num_steps, writer.num_episodes, added, seconds, mean_return)


def _shorten(ep: Episode, keep: int) -> Episode:
    """The first `keep` steps of `ep`, marked as cut by the step budget."""
    truncated = ep.truncated[:keep].copy()
    truncated[-1] = True
    return Episode(ep.frames[: len(ep.frames) - (ep.length - keep)], ep.teacher_outputs[:keep], ep.action[:keep],
                   ep.reward[:keep], np.zeros(keep, dtype=bool), truncated, ep.life_lost[:keep], False,
                   ep.policy, ep.epsilon, ep.env_seed, ep.env_episode)


def _build_in_worker(kwargs: dict) -> BuildResult:
    torch.set_num_threads(1)
    return build_dataset(**{**kwargs, "show_progress": False})  # bars of parallel games would interleave


def build_many(jobs: Sequence[dict], workers: int) -> list[BuildResult]:
    """One process per game; a failing game does not stop the others. Raises after all finished."""
    if len(jobs) == 1:
        return [build_dataset(**jobs[0])]
    ctx = multiprocessing.get_context("spawn")
    results, errors = [], []
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx) as pool:
        futures = [(job["game_name"], pool.submit(_build_in_worker, job)) for job in jobs]
        for game, fut in futures:
            try:
                results.append(fut.result())
            except UserError as e:
                errors.append(f"{game}: {e}")
    if errors:
        raise UserError("; ".join(errors))
    return results


def check_teacher_outputs(reader, teacher: Agent, sample: int = 1000, seed: int = 0) -> list[str]:
    """Stored outputs must equal teacher(observation) on a random sample of steps."""
    from multitask.checkpoints import check_agent_game

    game = get_game(reader.game)
    head = check_agent_game(teacher, game)
    problems = []
    if teacher.sha256 != reader.info.teacher.get("sha256"):
        problems.append(f"the dataset was labelled by teacher sha256 {reader.info.teacher.get('sha256', '?')[:12]}, "
                        f"not {teacher.path} ({teacher.sha256[:12]})")
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(reader), size=min(sample, len(reader)), replace=False))
    worst = 0.0
    for chunk in np.array_split(idx, max(1, len(idx) // 256)):
        with torch.inference_mode():
            q = teacher.net(torch.from_numpy(reader.obs(chunk)), head).numpy()
        stored = reader.steps["teacher_outputs"][chunk]
        worst = max(worst, float(np.max(np.abs(q - stored) / (1.0 + np.abs(q)))))
    if worst > 1e-4:  # batched vs unbatched inference differ in the last bits only
        problems.append(f"stored teacher outputs differ from the teacher's by up to {worst:.3g} (relative) "
                        f"on {len(idx)} sampled steps")
    return problems
