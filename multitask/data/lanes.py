"""Lanes: a vector env played by the teacher, in the caller or in a helper process.

The dataset recorder splits its envs into lanes. A lane's turn is one teacher forward pass on the
lane's observations, the control policy's actions (`act`, data/control.py) and one vector
step on them. The caller plays the first lane itself (`LocalLane`); each other lane plays in a
forked helper (`RemoteLane`) that builds its own env, then plays turn after turn into a ring of
slots in shared memory, up to RING turns ahead of the caller, who reads them in order and keeps the
books of every lane. Each process thus alternates one forward pass and one env step with no one to
wait for: on 2 cores, two lanes keep both cores busy. (An earlier design ran only the teacher in the
helper, for both lanes, and handed it one lane's observations while the caller stepped the other:
on Atari the caller then waited for the teacher 14% of the time while ale-py's threads and the
forward pass fought over the cores; measured with timestamps in both processes.) A helper also
builds its env in parallel with the caller's: Atari's start-up with 32 envs fell from 7.2-8.3 s to
4.9-6.4 s (ale-py loads every ROM twice, ~0.27 s of CPU per env; measured).

A lane's turns are a function of its env seeds and its own action generator (the helper's copy,
made at the fork), never of timing, so a build is reproducible however the processes interleave.

Neither side makes a system call per turn: waking a process blocked on a pipe cost ~40 us per
hand-off on the dev VM and let the woken process preempt the waker (measured), so each side polls
counters in shared memory, yielding the core for a short while and then sleeping in short naps.
The counters are plain stores read by the other process: x86-64 keeps stores in order (a slot's
data is visible before its counter), so `start` uses helpers only there.

The teacher's outputs come from a `Forward` (data/inference.py): the teacher in the lane's own
process, or the inference server that answers every lane from one process (a GPU build's).
"""

from __future__ import annotations

import mmap
import os
from typing import Callable, NamedTuple

import numpy as np
import torch

from multitask.envs import GameSpec, Step, VectorEnv, make_vector_env
from multitask.data.control import Act  # act(teacher outputs, observations) -> actions
from multitask.data.inference import Forward
from multitask.data.processes import become_helper, fork_context, shared_counters_supported, stop_process, wait_until

# Turns a helper may play ahead of the caller: enough to ride out the caller's bookkeeping bursts
# (cutting episodes, handing a flush to the writer) without the helper waiting.
RING = 4



class Turn(NamedTuple):
    outputs: np.ndarray  # (n, num_outputs) float32: the teacher's raw outputs on the lane's observations
    actions: np.ndarray  # (n,) int64: act(outputs, obs)
    step: Step  # the lane's vector step on those actions


def cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _shared(shape: tuple[int, ...], dtype) -> np.ndarray:
    """A zeroed array in anonymous shared memory: a forked child and its parent see each other's writes."""
    count = int(np.prod(shape))
    buf = mmap.mmap(-1, max(1, count * np.dtype(dtype).itemsize))
    return np.frombuffer(buf, dtype=dtype, count=count).reshape(shape)


def _turn(forward: Forward, act: Act, env: VectorEnv, obs: np.ndarray) -> Turn:
    """The teacher's outputs (`forward`: in this process, or from the inference server), the
    actions, one vector step."""
    outputs = forward(obs)
    actions = np.asarray(act(outputs, obs), dtype=np.int64)
    return Turn(outputs, actions, env.step(actions))


class LocalLane:
    """A lane played in the caller: each `turn()` runs the forward pass and the env step."""

    def __init__(self, game: GameSpec, num_envs: int, seed: int, forward: Forward, act: Act, env_threads: int = 0):
        self.num_envs = num_envs
        self._forward, self._act = forward, act
        self._env = make_vector_env(game, num_envs, num_threads=env_threads)
        self._obs = self._env.reset(seed)

    def first_obs(self) -> np.ndarray:
        """The observations of the reset (seeded with `seed`, env i with seed + i)."""
        return self._obs

    def turn(self) -> Turn:
        turn = _turn(self._forward, self._act, self._env, self._obs)
        self._obs = turn.step.obs
        return turn

    def close(self) -> None:
        self._env.close()


class _Ring(NamedTuple):
    """A helper lane's shared memory: RING slots of turns, the reset's observations, counters."""

    outputs: np.ndarray  # (RING, n, num_outputs) float32
    actions: np.ndarray  # (RING, n) int64
    obs: np.ndarray  # (RING, n, *obs_shape) uint8
    next_obs: np.ndarray
    reward: np.ndarray  # (RING, n) float32
    terminated: np.ndarray  # (RING, n) bool
    truncated: np.ndarray
    life_lost: np.ndarray
    first: np.ndarray  # (n, *obs_shape) uint8: the reset's observations
    seq: np.ndarray  # [0]: turns played, [1]: turns read by the caller, [2]: 1 once `first` is set, [3]: 1 = stop

    @classmethod
    def create(cls, n: int, obs_shape: tuple[int, ...], num_outputs: int) -> "_Ring":
        def arr(dtype, *shape):
            return _shared((RING, n, *shape), dtype)
        return cls(arr(np.float32, num_outputs), arr(np.int64), arr(np.uint8, *obs_shape), arr(np.uint8, *obs_shape),
                   arr(np.float32), arr(np.bool_), arr(np.bool_), arr(np.bool_), _shared((n, *obs_shape), np.uint8),
                   _shared((4,), np.int64))

    def put(self, slot: int, turn: Turn) -> None:
        step = turn.step
        for dest, src in zip(self[:8], (turn.outputs, turn.actions, step.obs, step.next_obs, step.reward,
                                        step.terminated, step.truncated, step.life_lost)):
            dest[slot] = src

    def get(self, slot: int) -> Turn:
        """A copy of the slot's turn (the slot is reused once the caller has read it)."""
        o, a, obs, nxt, r, term, trunc, life = (x[slot].copy() for x in self[:8])
        return Turn(o, a, Step(obs, nxt, r, term, trunc, life))


class RemoteLane:
    """A lane played in a forked helper, up to RING turns ahead; `turn()` returns them in order."""

    def __init__(self, game: GameSpec, num_envs: int, seed: int, forward: Forward, act: Act, env_threads: int = 0):
        self.num_envs = num_envs
        self._ring = _Ring.create(num_envs, game.obs_shape, game.num_actions)
        self._read = 0
        ctx = fork_context()
        self._errors, child = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_serve, args=(game, num_envs, seed, forward, act, env_threads, self._ring,
                                                      child, os.getpid()),
                                 daemon=True, name="lane")
        self._proc.start()
        child.close()

    @classmethod
    def start(cls, game: GameSpec, num_envs: int, seed: int, forward: Forward, act: Act,
              env_threads: int = 0) -> "RemoteLane | LocalLane":
        if not shared_counters_supported():
            return LocalLane(game, num_envs, seed, forward, act, env_threads)
        return cls(game, num_envs, seed, forward, act, env_threads)

    def _wait(self, ready: Callable[[], bool]) -> None:
        if not wait_until(ready, self._proc.is_alive) and not ready():
            error = self._errors.recv_bytes().decode() if self._errors.poll() else "it exited"
            self.close()
            raise RuntimeError(f"the helper process playing a lane failed: {error}")

    def first_obs(self) -> np.ndarray:
        seq = self._ring.seq
        self._wait(lambda: seq[2] == 1)
        return self._ring.first.copy()

    def turn(self) -> Turn:
        seq, read = self._ring.seq, self._read
        self._wait(lambda: seq[0] > read)
        turn = self._ring.get(read % RING)
        self._read = seq[1] = read + 1
        return turn

    def close(self) -> None:
        self._ring.seq[3] = 1
        stop_process(self._proc, timeout=10)
        self._errors.close()


def _serve(game: GameSpec, num_envs: int, seed: int, forward: Forward, act: Act, env_threads: int,
           ring: _Ring, errors, parent: int) -> None:
    """Helper side: build and reset the lane's env, then play turns into the ring until asked to stop."""
    if not become_helper(parent):
        return
    torch.set_num_threads(1)  # also keeps a forked OpenMP runtime from waiting on the parent's threads
    seq = ring.seq
    env = None
    try:
        env = make_vector_env(game, num_envs, num_threads=env_threads)
        obs = env.reset(seed)
        ring.first[:] = obs
        seq[2] = 1
        played = 0
        while not seq[3]:
            turn = _turn(forward, act, env, obs)  # played before waiting for a free slot
            if not wait_until(lambda: seq[0] - seq[1] < RING or seq[3], lambda: os.getppid() == parent) or seq[3]:
                return
            ring.put(played % RING, turn)
            played += 1
            seq[0] = played
            obs = turn.step.obs
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises
        errors.send_bytes(f"{type(e).__name__}: {e}".encode())
    finally:
        if env is not None:
            env.close()
