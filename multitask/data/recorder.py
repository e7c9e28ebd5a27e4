"""Recording: the control policy plays and every step becomes part of an episode for the writer.

The teacher (or a student, or a mixture: data/control.py) acts epsilon-greedily on batches of
observations; the teacher's raw outputs for the observation acted on are stored with the step (its
forward passes run in each lane, or in one inference server: `inference`). The envs play in lanes
(`lanes`), each in its own process: the caller plays the first and a helper each other one, every
lane alternating the teacher's forward pass and its env step, so that the cores stay busy; the
caller reads the helpers' turns in order and keeps the books of every lane (`_Lane`).
Per vector step a lane only appends whole arrays to a time log; an env's episode is cut out of the
log when it ends, so bookkeeping costs O(1) numpy calls per vector step whatever the number of envs.
Completed episodes are flushed to disk in the background (`background`; see `writer` for the
crash-safety protocol); a build stops at exactly `steps` steps by cutting the episodes still running
at the end (stored with complete = false), and its last episodes go straight into the consolidated
file. `build` checks everything and opens the file before `record` starts.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from multitask.agents.checkpoints import Agent
from multitask.data.background import BackgroundWriter
from multitask.data.build_config import DatasetConfig
from multitask.data.control import Control, make_act
from multitask.data.inference import Forward, InferenceServer, NetForward
from multitask.data.lanes import LocalLane, RemoteLane, cores
from multitask.data.schema import Episode, now_iso
from multitask.data.writer import DatasetWriter
from multitask.envs import GameSpec
from multitask.envs.framestack import newest_frame, split_frames
from multitask.progress import Progress

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
         epsilon: float, env_seed: int, env_episode: int, policy: int) -> Episode:
    """The episode of `env` made of vector steps [start, stop)."""
    q, act, rew, term, trunc, life, nxt = (log.column(env, start, stop, k) for k in range(7))
    if not complete:
        trunc[-1] = True  # cut by the step budget (column() returned a copy)
    return Episode(frames=np.concatenate([start_frames, nxt]), teacher_outputs=q.astype(np.float32, copy=False),
                   action=act, reward=rew.astype(np.float32, copy=False), terminated=term, truncated=trunc,
                   life_lost=life, complete=complete, policy=policy, epsilon=epsilon,
                   env_seed=env_seed, env_episode=env_episode)


class _Lane:
    """One lane's books: its running episodes and the time log they are cut from.

    Env i of the lane is env `first + i` of the build (seed stream_seed + first + i); its turns come
    from `player`, in this process or in a helper (`lanes`), and are a function of the seeds alone.
    """

    def __init__(self, player: LocalLane | RemoteLane, first: int, stream_seed: int, c: int, policy: int):
        self.player, self.n, self.c, self.policy = player, player.num_envs, c, policy
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
                    self.env_seeds[i], self.env_episode[i], self.policy)


def record(game: GameSpec, teacher: Agent, writer: DatasetWriter | BackgroundWriter, cfg: DatasetConfig,
           stream_seed: int, builds: list, show_progress: bool, observe: Observer | None,
           control: Control | None = None, policy: int = 0) -> BuildResult:
    """Play `cfg` (resolved: num_envs, lanes, flush_steps filled in) until the dataset holds cfg.steps steps,
    then finalize it; `builds` (with this build's entry last) goes into the file at every flush. `control`
    plays (default: the teacher) and its episodes record `policy`, its index in the file's policies."""
    control = control or Control("teacher")
    steps, epsilon, n, lanes = cfg.steps, cfg.epsilon, cfg.num_envs, cfg.lanes
    # ---- Play: each lane in its own process, the first in this one --------------------------------
    sizes = [len(s) for s in np.array_split(np.arange(n), lanes)]
    firsts = [int(f) for f in np.cumsum([0, *sizes[:-1]])]
    head = teacher.net.head_index(game.name)
    # Each lane's process alternates a forward pass and an env step, so the cores are shared out
    # between lanes: the envs' threads (ale-py) get cores / lanes each, and each lane's forward pass
    # one torch thread (a forked helper must run one; see lanes._serve). One lane runs one thread as
    # well: with torch's default two, a MinAtar build from 16 envs ran at 597 steps/s while another
    # process held a core, and at 24,000 steps/s with one (measured 2026-11-30, 2-core machine).
    share = max(1, cores() // lanes)
    torch_threads = torch.get_num_threads()
    players: list[LocalLane | RemoteLane] = []
    server = None
    try:
        torch.set_num_threads(1)
        # The teacher's forward passes: in one server process for all lanes (cfg is resolved: a GPU
        # build's default), or in each lane's process (on cuda, then, one lane: no CUDA after fork).
        if cfg.inference == "server":
            server = InferenceServer(teacher.net, head, cfg.device, sizes, game.obs_shape, game.num_actions)
            forwards: list[Forward] = list(server.clients())
            ready = server.wait_ready
        else:
            local = NetForward(teacher.net.to(cfg.device), head)
            forwards = [local] * lanes

            def ready() -> None:
                local.warm_up({sizes[0]}, game.obs_shape)

        def lane(k: int, start: Callable[..., LocalLane | RemoteLane]) -> LocalLane | RemoteLane:
            # each lane draws its exploration from its own generator, in the process that plays it
            rng = np.random.default_rng([stream_seed + 1_000_003, firsts[k]])
            return start(game, sizes[k], stream_seed + firsts[k], forwards[k], make_act(control, game, epsilon, rng),
                         share)
        # helpers first: they build their envs while this process builds its own
        players.extend(lane(k, RemoteLane.start) for k in range(1, lanes))
        players.insert(0, lane(0, LocalLane))
        play = [_Lane(player, first, stream_seed, game.frame_shape[0], policy) for player, first in zip(players, firsts)]
        ready()  # the device set up before the clock starts: a GPU's first calls take seconds
        return _play(game, play, writer, steps, epsilon, builds, cfg.flush_steps, cfg.flush_seconds, show_progress,
                     observe)
    finally:
        for player in players:
            player.close()
        if server is not None:
            server.close()
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

    # ---- End: cut the running episodes to land on exactly `steps`, flush, consolidate -----------
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
