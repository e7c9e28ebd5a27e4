"""`multitask dataset build`: a teacher plays, every step goes into the game's HDF5 dataset.

The teacher acts epsilon-greedily (0.05, Rusu et al. 2016) on batches of observations; its raw
outputs for the observation it acted on are stored with the step. The envs play in lanes (two by
default), each in its own process (`lanes`): the caller plays the first and a helper each other one,
every lane alternating the teacher's forward pass and its env step, so that the cores stay busy; the
caller reads the helpers' turns in order and keeps the books of every lane.
Per vector step a lane only appends whole arrays to a time log; an env's episode is cut out of the
log when it ends, so bookkeeping costs O(1) numpy calls per vector step whatever the number of envs.
Completed episodes are flushed to disk in the background (see `storage` for the crash-safety
protocol); a build stops at exactly `steps` steps by cutting the episodes still running at the end
(stored with complete = false), and its last episodes go straight into the consolidated file.
"""

from __future__ import annotations

import gc
import itertools
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
from multitask.agents.checkpoints import Agent, load_teacher
from multitask.agents.dqn import epsilon_greedy
from multitask.envs import GameSpec, get_game
from multitask.errors import UserError
from multitask.envs.framestack import newest_frame, split_frames
from multitask.data.lanes import LocalLane, RemoteLane, cores
from multitask.progress import Progress
from multitask.data.storage import (BackgroundWriter, Compression, DatasetWriter, Episode, _check_schema, _open_h5,
                               bytes_per_step, dataset_exists, now_iso, remove_dataset)

DEFAULT_EPSILON = 0.05  # Rusu et al. 2016: the teacher plays epsilon-greedy with 0.05
# In all lanes. MinAtar: 128 envs per lane amortise the per-vector-step Python work (200k Breakout
# steps on one core: 6.9 s with 32 envs, 5.0 s with 128; measured). Atari: 16 per lane, because the
# teacher's one-thread forward pass costs less per observation in batches of 16 than of 8 (2,500 vs
# 1,900 per second; measured).
DEFAULT_NUM_ENVS = {"atari": 32, "minatar": 256}
# Two lanes, one per core of the 2-core dev machine: each lane's process keeps one core busy with
# its forward passes and env steps (on more cores, pass more lanes: each gets cores / lanes threads).
DEFAULT_LANES = 2

# Completed episodes are flushed once they hold this much (or every flush_seconds): MinAtar's
# ~440-byte steps flush every ~75k steps, Atari's ~7 KB steps every ~4.7k. Each flush costs the
# writer a part file and a new master whatever its size (MinAtar: 0.58 CPU-s per 200k steps in 3
# flushes vs 1.11 in 10; measured), and a crash loses at most what is pending.
FLUSH_BYTES = 32 << 20

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

    Rows (vector steps) live in fixed blocks of BLOCK_ROWS, one array per field indexed
    [row in block, env], so cutting an episode out is a slice per field and block (stacking per-step
    rows was a fifth of MinAtar recording time, measured with cProfile). Blocks before the oldest
    running episode go back to a free list and are reused: nothing is ever copied to make room, and
    the memory stays mapped (a log of one growing array spent 0.3 s of a 200k-step MinAtar build
    doubling and first-touching up to 200 MB; measured).
    """

    BLOCK_ROWS = 256

    def __init__(self):
        self.rows = 0  # vector steps appended
        self.first_block = 0  # index of blocks[0]
        self.blocks: list[list[np.ndarray]] = []  # per block: (q, action, reward, terminated, truncated, life_lost, next_frame)
        self.free: list[list[np.ndarray]] = []

    def append(self, entry: tuple) -> None:
        offset = self.rows % self.BLOCK_ROWS
        if offset == 0:
            self.blocks.append(self.free.pop() if self.free else
                               [np.empty((self.BLOCK_ROWS, *np.shape(x)), np.asarray(x).dtype) for x in entry])
        for buf, x in zip(self.blocks[-1], entry):
            buf[offset] = x
        self.rows += 1

    def column(self, env: int, start: int, stop: int, field: int) -> np.ndarray:
        """Rows [start, stop) of one env's field, as a new array."""
        b0, b1 = start // self.BLOCK_ROWS, (stop - 1) // self.BLOCK_ROWS
        if b0 == b1:
            return self.blocks[b0 - self.first_block][field][start % self.BLOCK_ROWS:(stop - 1) % self.BLOCK_ROWS + 1,
                                                         env].copy()
        pieces = [self.blocks[b - self.first_block][field][:, env] for b in range(b0, b1 + 1)]
        pieces[0] = pieces[0][start % self.BLOCK_ROWS:]
        pieces[-1] = pieces[-1][:(stop - 1) % self.BLOCK_ROWS + 1]
        return np.concatenate(pieces)

    def prune(self, keep_from: int) -> None:
        """Rows before `keep_from` are no longer needed."""
        drop = min(keep_from // self.BLOCK_ROWS - self.first_block, len(self.blocks) - 1)
        if drop > 0:
            self.free.extend(self.blocks[:drop])
            del self.blocks[:drop]
            self.first_block += drop


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
                  seed: int = 0, num_envs: int | None = None, lanes: int = DEFAULT_LANES, resume: bool = False,
                  overwrite: bool = False, flush_steps: int | None = None, flush_seconds: float = 60.0,
                  compression: Compression | None = None,
                  show_progress: bool = True, observe: Observer | None = None) -> BuildResult:
    # ---- Phase 1: check everything, then open the output --------------------------------------
    game = get_game(game_name)
    teacher, _ = load_teacher(teacher_path, game)
    out = Path(out)
    if steps < 1:
        raise UserError("--steps must be positive")
    if not 0.0 <= epsilon <= 1.0:
        raise UserError("--epsilon must be in [0, 1]")
    n = num_envs or DEFAULT_NUM_ENVS[game.suite]
    if n < 1 or lanes < 1:
        raise UserError("--num-envs and --lanes must be positive")
    lanes = min(lanes, n)
    if flush_steps is None:
        flush_steps = max(1, FLUSH_BYTES // bytes_per_step(game.frame_shape, game.num_actions))
    elif flush_steps < 1:
        raise UserError("--flush-steps must be positive")
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
    stream_seed = seed + 7919 * len(builds)  # each build/resume plays fresh, distinct env streams
    builds.append({"command": configlib.command_line(), "seed": seed, "env_seeds": [stream_seed, stream_seed + n - 1],
                   "epsilon": epsilon, "num_envs": n, "lanes": lanes, "started": now_iso(),
                   "steps_before": writer.num_steps})

    # The play loop allocates many small containers; without freezing, each full collection walks
    # the ~280k objects that torch and MinAtar's imports leave behind (0.13 s each, 0.4 s per
    # 200k-step MinAtar build; measured). Frozen before the helpers fork, so they inherit it.
    gc.freeze()
    writer = BackgroundWriter.start(writer)  # compression and HDF5 writes overlap the teacher's play
    try:
        return _record(game, teacher, writer, steps, epsilon, n, lanes, stream_seed, builds, flush_steps,
                       flush_seconds, show_progress, observe)
    except BaseException:
        writer.close()
        if created_here and writer.durable_steps == 0:
            remove_dataset(out)  # nothing recorded: leave nothing that looks like a dataset
        raise
    finally:
        gc.unfreeze()


class _Lane:
    """One lane's books: its running episodes and the time log they are cut from.

    Env i of the lane is env `first + i` of the build (seed stream_seed + first + i); its turns come
    from `player`, in this process or in a helper (`lanes`), and are a function of the seeds alone.
    """

    def __init__(self, player: LocalLane | RemoteLane, first: int, stream_seed: int, c: int):
        self.player, self.n, self.c = player, player.num_envs, c
        self.env_seeds = stream_seed + first + np.arange(self.n)
        self.obs = player.first_obs()  # what the teacher acts on next
        self.log = _TimeLog()
        self.t = 0  # vector steps played
        self.start = np.zeros(self.n, dtype=np.int64)  # vector step at which each env's episode began
        self.start_frames = [split_frames(self.obs[i], c) for i in range(self.n)]  # pads + s_0
        self.env_episode = np.zeros(self.n, dtype=np.int64)

    def step(self, epsilon: float, observe: Observer | None) -> list[Episode]:
        """Log the lane's next turn; return the episodes it ended."""
        if observe is not None:
            observe(self.obs, self.env_seeds, self.env_episode, self.running())
        q, actions, step = self.player.turn()
        self.log.append((q, actions, step.reward, step.terminated, step.truncated, step.life_lost,
                         newest_frame(step.next_obs, self.c)))
        self.t += 1
        done = []
        for i in np.flatnonzero(step.done):
            done.append(self.cut(i, self.t, True, epsilon))
            self.start[i], self.env_episode[i] = self.t, self.env_episode[i] + 1
            self.start_frames[i] = split_frames(step.obs[i], self.c)
        self.log.prune(int(self.start.min()))
        self.obs = step.obs
        return done

    def running(self) -> np.ndarray:
        """Steps of each env's running episode."""
        return self.t - self.start

    def cut(self, i: int, stop: int, complete: bool, epsilon: float) -> Episode:
        return _cut(self.log, i, self.start[i], stop, self.start_frames[i], complete, epsilon,
                    self.env_seeds[i], self.env_episode[i])


def _record(game: GameSpec, teacher: Agent, writer: DatasetWriter | BackgroundWriter, steps: int, epsilon: float,
            n: int, lanes: int, stream_seed: int, builds: list, flush_steps: int, flush_seconds: float,
            show_progress: bool, observe: Observer | None) -> BuildResult:
    # ---- Phase 2: play: each lane in its own process, the first in this one ---------------------
    sizes = [len(s) for s in np.array_split(np.arange(n), lanes)]
    firsts = [int(f) for f in np.cumsum([0, *sizes[:-1]])]
    head = teacher.net.head_index(game.name)
    # Each lane's process alternates a forward pass and an env step, so the cores are shared out
    # between lanes: the envs' threads (ale-py) get cores / lanes each, and each lane's forward pass
    # one torch thread (a forked helper must run one; see lanes._serve). One lane keeps the caller's.
    share = max(1, cores() // lanes)
    torch_threads = torch.get_num_threads()
    players: list[LocalLane | RemoteLane] = []
    try:
        if lanes > 1:
            torch.set_num_threads(1)

        def lane(k: int, start: Callable[..., LocalLane | RemoteLane]) -> LocalLane | RemoteLane:
            # each lane draws its exploration from its own generator, in the process that plays it
            rng = np.random.default_rng([stream_seed + 1_000_003, firsts[k]])
            return start(game, sizes[k], stream_seed + firsts[k], teacher.net, head,
                         lambda q: epsilon_greedy(q, epsilon, rng), share)
        # helpers first: they build their envs while this process builds its own
        players.extend(lane(k, RemoteLane.start) for k in range(1, lanes))
        players.insert(0, lane(0, LocalLane))
        play = [_Lane(player, first, stream_seed, game.frame_shape[0]) for player, first in zip(players, firsts)]
        return _play(game, play, writer, steps, epsilon, builds, flush_steps, flush_seconds, show_progress, observe)
    finally:
        for player in players:
            player.close()
        torch.set_num_threads(torch_threads)


def _is_last_stretch(to_play: int, flush_steps: int, flush_seconds: float, played: int, elapsed: float) -> bool:
    """Whether the rest of a build is short enough to be staged rather than flushed: fewer than
    `flush_steps` steps to play, which at the rate so far (played / elapsed) take under
    `flush_seconds`. Staged episodes skip the part file and the master of a flush (90-125 ms of the
    writer's time each near the end of a 200k MinAtar build; measured) but stay at risk until the
    final rename, so a crash loses at most what a flush would have bounded: a flush's steps and
    flush_seconds of play."""
    return to_play < flush_steps and to_play * elapsed < flush_seconds * played


def _play(game: GameSpec, play: list[_Lane], writer: DatasetWriter | BackgroundWriter, steps: int, epsilon: float,
          builds: list, flush_steps: int, flush_seconds: float, show_progress: bool,
          observe: Observer | None) -> BuildResult:
    pending: list[Episode] = []
    pending_steps, before = 0, writer.num_steps
    last_flush = time.perf_counter()
    t0 = time.perf_counter()
    returns: list[float] = []
    bar = Progress(steps, f"dataset {game.name}", initial=before, enabled=show_progress)

    def flush(final: bool = False, stage: bool = False) -> None:
        nonlocal pending, pending_steps, last_flush
        builds[-1]["steps_after"] = writer.num_steps + pending_steps
        builds[-1]["finished" if final else "updated"] = now_iso()
        if final:  # the last episodes go straight into the consolidated file
            writer.finalize({"builds": json.dumps(builds)}, pending)
        elif stage:
            writer.stage(pending, {"builds": json.dumps(builds)})
        else:
            writer.flush(pending, {"builds": json.dumps(builds)})
        pending, pending_steps, last_flush = [], 0, time.perf_counter()

    # Every step played is in exactly one episode: written, pending or running. Counted, not summed
    # over the lanes' running episodes at every vector step (2% of a MinAtar build's caller; py-spy).
    played = 0
    tail = False  # staging the last stretch (see below)
    for k in itertools.count():
        lane = play[k % len(play)]
        done = lane.step(epsilon, observe)
        played += lane.n
        for ep in done:
            pending.append(ep)
            pending_steps += ep.length
            returns.append(float(ep.reward.sum()))
        bar.update(lane.n, postfix=f"return {sum(returns[-20:]) / len(returns[-20:]):.1f}" if done else None)
        to_play = steps - before - played
        if to_play <= 0:
            break  # before any flush: the last vector step's episodes must stay cuttable
        # The last stretch is staged, not flushed (see _is_last_stretch), whenever as much is
        # pending as remains to play: the writer finishes each half while the next is played, so the
        # build's tail (waiting for the last episodes to be compressed) stays short. Once staging has
        # begun it goes on to the end (no flush may follow a stage).
        tail = tail or _is_last_stretch(to_play, flush_steps, flush_seconds, played, time.perf_counter() - t0)
        due = min(flush_steps, max(to_play, flush_steps // 16))
        if pending_steps >= due or (pending and time.perf_counter() - last_flush > flush_seconds):
            flush(stage=tail)

    # ---- Phase 3: cut the running episodes to land on exactly `steps`, flush, consolidate --------
    excess = before + played - steps
    running = [[lane, i, int(length)] for lane in play for i, length in enumerate(lane.running())]
    for entry in reversed(running):  # trim running episodes from the last env backwards
        cut = min(excess, entry[2])
        entry[2] -= cut
        excess -= cut
    while excess > 0:  # every env had just reset: shorten the newest completed episode instead
        ep = pending.pop()
        keep = ep.length - excess
        excess = max(0, -keep)
        if keep > 0:
            pending.append(_shorten(ep, keep))
    pending_steps = sum(e.length for e in pending)
    for lane, i, length in running:
        if length > 0:
            ep = lane.cut(i, lane.start[i] + length, False, epsilon)
            pending.append(ep)
            pending_steps += ep.length
    bar.n = writer.num_steps + pending_steps
    bar.close()
    flush(final=True)
    seconds = time.perf_counter() - t0
    added = writer.num_steps - before
    mean_return = float(np.mean(returns)) if returns else float("nan")
    # e.g. Freeway's 2,500-step games on 256 envs: 200k steps end every episode by the step budget
    returned = f"mean return {mean_return:.1f}" if returns else "no episode ended before the step budget cut it"
    print(f"dataset {game.name}: {writer.num_steps:,} steps, {writer.num_episodes:,} episodes "
          f"(+{added:,} steps in {seconds:.0f}s, {added / max(seconds, 1e-9):,.0f} steps/s, "
          f"{returned}) -> {writer.path}")
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
    # Parallel games already use the cores: one lane each, no teacher helper. No bars: they would interleave.
    return build_dataset(**{**kwargs, "lanes": 1, "show_progress": False})


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
    from multitask.agents.checkpoints import check_agent_game

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
