"""A network answering batched forward passes in a helper process, one "lane" of inputs at a time.

The dataset recorder plays two lanes of envs: while the helper runs the teacher on one lane's
observations, the caller steps the other lane's envs and keeps its books. On a CPU the two would
otherwise take turns (MinAtar's games are pure Python; the teacher's forward pass on 128
observations takes as long as stepping them, ~1 ms each on the 2-core dev machine).

Each lane's input, output and request/answer counters live in shared memory mapped before the
fork. Neither side makes a system call per request: waking a process blocked on a pipe cost
~40 us per hand-off on the dev VM and let the woken process preempt the waker (a build spent 0.3 s
in 1-byte pipe writes; measured), so each side polls the counters, yielding the core for a short
while and then sleeping in short naps (the envs' or the writer's threads get the core meanwhile).
The helper runs one torch thread and dies with its parent (`processes.become_helper`). Where
helpers are unsupported, `start` returns `LocalNet`, which computes at `submit`, with the same calls.

The policy on top of the outputs (`act`: the recorder's epsilon-greedy) runs where the outputs are
computed, so the actions come back with them: it was ~4% of the caller's time in a MinAtar build,
whose caller (envs and bookkeeping) is the busier side (py-spy). Its state, e.g. each lane's random
generator, lives in the process that runs it: the helper's copy, made at the fork.

The counters are plain stores read by the other process: x86-64 keeps stores in order (the output
is visible before its counter), so `start` uses the helper only there.
"""

from __future__ import annotations

import mmap
import os
import platform
import time
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch

from multitask.processes import background_supported, become_helper, fork_context

SPIN_SECONDS = 200e-6  # yield-spin this long before napping: covers MinAtar's gaps between requests
NAP_SECONDS = 50e-6


def _shared(shape: tuple[int, ...], dtype) -> np.ndarray:
    """A zeroed array in anonymous shared memory: a forked child and its parent see each other's writes."""
    count = int(np.prod(shape))
    buf = mmap.mmap(-1, max(1, count * np.dtype(dtype).itemsize))
    return np.frombuffer(buf, dtype=dtype, count=count).reshape(shape)


def _wait_until(ready: Callable[[], bool], alive: Callable[[], bool]) -> bool:
    """Poll `ready`: yield-spin for SPIN_SECONDS, then nap; False as soon as `alive` is not."""
    start, naps = time.perf_counter(), 0
    while not ready():
        if time.perf_counter() - start < SPIN_SECONDS:
            os.sched_yield()
            continue
        time.sleep(NAP_SECONDS)
        naps += 1
        if naps % 256 == 0 and not alive():
            return False
    return True


class Answer(NamedTuple):
    outputs: np.ndarray  # (batch, num_outputs) float32: the net's raw outputs
    actions: np.ndarray  # (batch,) int64: act(lane, outputs)


# act(lane, outputs) -> actions: the policy applied to a lane's outputs
Act = Callable[[int, np.ndarray], np.ndarray]


def greedy(lane: int, outputs: np.ndarray) -> np.ndarray:
    """argmax over outputs, per row."""
    return outputs.argmax(1)


def _forward(net: torch.nn.Module, head: int, obs: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return net(torch.from_numpy(obs), head).numpy()


class LocalNet:
    """`net(obs, head)` and `act` in the caller's process, behind the RemoteNet calls."""

    def __init__(self, net: torch.nn.Module, head: int, lanes: int, act: Act = greedy):
        self._net, self._head, self._act = net, head, act
        self._answer: list[Answer | None] = [None] * lanes

    def submit(self, lane: int, obs: np.ndarray) -> None:
        out = _forward(self._net, self._head, obs)
        self._answer[lane] = Answer(out, np.asarray(self._act(lane, out), dtype=np.int64))

    def result(self, lane: int) -> Answer:
        answer, self._answer[lane] = self._answer[lane], None
        return answer

    def close(self) -> None:
        pass


class RemoteNet:
    """`net(obs, head)` and `act` computed in a helper process; `submit` returns at once, `result` waits.

    Lane k takes batches of exactly `batch_sizes[k]` observations of `obs_shape` (uint8) and gives
    (batch, num_outputs) float32 outputs and (batch,) actions. At most one request per lane is in flight.
    """

    def __init__(self, net: torch.nn.Module, head: int, batch_sizes: Sequence[int], obs_shape: tuple[int, ...],
                 num_outputs: int, act: Act = greedy):
        self._obs = [_shared((n, *obs_shape), np.uint8) for n in batch_sizes]
        self._out = [_shared((n, num_outputs), np.float32) for n in batch_sizes]
        self._actions = [_shared((n,), np.int64) for n in batch_sizes]
        # [0, k]: requests sent on lane k, [1, k]: answered; [2, 0]: 1 asks the helper to stop
        self._seq = _shared((3, len(batch_sizes)), np.int64)
        ctx = fork_context()
        self._errors, child = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_serve, args=(net, head, act, self._obs, self._out, self._actions, self._seq,
                                                      child, os.getpid()),
                                 daemon=True, name="teacher")
        self._proc.start()
        child.close()

    @classmethod
    def start(cls, net: torch.nn.Module, head: int, batch_sizes: Sequence[int], obs_shape: tuple[int, ...],
              num_outputs: int, act: Act = greedy) -> "RemoteNet | LocalNet":
        if not background_supported() or platform.machine() not in ("x86_64", "AMD64"):
            return LocalNet(net, head, len(batch_sizes), act)
        return cls(net, head, batch_sizes, obs_shape, num_outputs, act)

    def submit(self, lane: int, obs: np.ndarray) -> None:
        self._obs[lane][:] = obs
        self._seq[0, lane] += 1

    def result(self, lane: int) -> Answer:
        seq = self._seq
        if not _wait_until(lambda: seq[1, lane] == seq[0, lane], self._proc.is_alive):
            error = self._errors.recv_bytes().decode() if self._errors.poll() else "it exited"
            self.close()
            raise RuntimeError(f"the teacher's helper process failed: {error}")
        return Answer(self._out[lane].copy(), self._actions[lane].copy())

    def close(self) -> None:
        self._seq[2, 0] = 1
        self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        self._errors.close()


def _serve(net, head: int, act: Act, obs: list[np.ndarray], out: list[np.ndarray], actions: list[np.ndarray],
           seq: np.ndarray, errors, parent: int) -> None:
    """Helper side: answer each lane's requests in turn until asked to stop."""
    if not become_helper(parent):
        return
    torch.set_num_threads(1)  # also keeps a forked OpenMP runtime from waiting on the parent's threads
    lanes = range(len(obs))

    def pending() -> bool:
        return bool(seq[2, 0]) or any(seq[0, k] != seq[1, k] for k in lanes)

    while _wait_until(pending, lambda: os.getppid() == parent) and not seq[2, 0]:
        for k in lanes:
            if seq[0, k] != seq[1, k]:
                try:
                    out[k][:] = _forward(net, head, obs[k])
                    actions[k][:] = act(k, out[k])
                except Exception as e:  # noqa: BLE001 - reported to the parent, which raises
                    errors.send_bytes(f"{type(e).__name__}: {e}".encode())
                    return
                seq[1, k] = seq[0, k]
