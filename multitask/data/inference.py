"""Where the recorder's teacher forward passes run: in each lane's own process (`NetForward`), or
for every lane in one inference server process (`InferenceServer`, `dataset build` with
inference = server, the default on a GPU).

Why a server: lanes play in forked helpers (`lanes`), and a forked process cannot use a CUDA
context its parent made, so without one a GPU build plays a single lane, its env steps and the
teacher's forward passes taking turns in one process. The server is spawned (a fresh interpreter
with a CUDA context of its own), holds the one copy of the teacher on the device, and answers each
lane's request with one forward pass on that lane's observations alone: the outputs are exactly
those of the lane's own forward pass on that device, whatever the timing. (Batching the requests
that happen to be waiting together would make the stored outputs depend on timing, in the last
bits, and a build would no longer be a function of its seeds.)

Each lane has a slot in shared memory: its observations, the teacher's outputs, and two counters
(requests made, requests answered). A client writes its observations, bumps `requests` and polls
`answered`; the server polls every slot. No system call per request (the reasons are `lanes`'s),
and like the lanes it relies on x86-64 keeping stores in order (a slot's data is visible before its
counter), so the server runs only on x86-64 Linux (`processes.shared_counters_supported`).
"""

from __future__ import annotations

import os
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
import torch.multiprocessing

from multitask.data.processes import become_helper, stop_process, wait_until
from multitask.devices import exact_fp32

# observations (n, *obs_shape) uint8 -> the teacher's raw outputs (n, num_outputs) float32
Forward = Callable[[np.ndarray], np.ndarray]
ERROR_BYTES = 512  # room for the server's one-line error in shared memory


class NetForward:
    """The teacher's forward pass in the calling process, on the net's device."""

    def __init__(self, net: torch.nn.Module, head: int):
        self.net, self.head = net, head
        self.device = next(net.parameters()).device

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.net(torch.from_numpy(obs).to(self.device), self.head).cpu().numpy()

    def warm_up(self, sizes: set[int], obs_shape: tuple[int, ...]) -> None:
        """One forward pass at each batch size, outputs dropped: a GPU's first calls (context,
        kernel choice, memory) happen here rather than in the first measured steps."""
        for n in sorted(sizes):
            self(np.zeros((n, *obs_shape), dtype=np.uint8))


class _Slot(NamedTuple):
    """One lane's requests, in shared memory (torch's: a spawned process maps it too)."""
    obs: torch.Tensor  # (n, *obs_shape) uint8
    outputs: torch.Tensor  # (n, num_outputs) float32
    seq: torch.Tensor  # (2,) int64: [0] requests made, [1] requests answered


class _Shared(NamedTuple):
    slots: tuple[_Slot, ...]
    state: torch.Tensor  # (3,) int64: [0] 1 = stop, [1] 1 = the server failed (its error in `error`), [2] 1 = ready
    error: torch.Tensor  # (ERROR_BYTES,) uint8: the failure, utf-8, zero-padded


def _running(pid: int) -> bool:
    """Whether process `pid` exists and has not exited (a zombie has); from any process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return False


class ServerForward:
    """A lane's forward pass through the server, called like `NetForward`. Made before the lanes
    fork, so that a helper lane uses the slot it inherited."""

    def __init__(self, slot: _Slot, shared: _Shared, server_pid: int):
        self._obs, self._outputs, self._seq = slot.obs.numpy(), slot.outputs.numpy(), slot.seq.numpy()
        self._state, self._error, self._pid = shared.state.numpy(), shared.error.numpy(), server_pid

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        self._obs[:] = obs
        wanted = self._seq[0] + 1
        self._seq[0] = wanted
        seq, state = self._seq, self._state
        if not wait_until(lambda: seq[1] == wanted or state[1], lambda: _running(self._pid)) or state[1]:
            message = bytes(self._error).rstrip(b"\0").decode(errors="replace") or "it exited"
            raise RuntimeError(f"the teacher's inference server failed: {message}")
        return self._outputs.copy()


class InferenceServer:
    """A spawned process answering every lane's forward passes with the teacher on `device`. The
    teacher is sent from the CPU (`net` is moved there) and moved to the device in the server."""

    def __init__(self, net: torch.nn.Module, head: int, device: str, lane_sizes: Sequence[int],
                 obs_shape: tuple[int, ...], num_outputs: int):
        def shared(dtype, *shape):
            return torch.zeros(shape, dtype=dtype).share_memory_()
        slots = tuple(_Slot(shared(torch.uint8, n, *obs_shape), shared(torch.float32, n, num_outputs),
                            shared(torch.int64, 2)) for n in lane_sizes)
        self._shared = _Shared(slots, shared(torch.int64, 3), shared(torch.uint8, ERROR_BYTES))
        ctx = torch.multiprocessing.get_context("spawn")
        self._proc = ctx.Process(target=_serve, args=(net.cpu(), head, device, self._shared, os.getpid()),
                                 daemon=True, name="teacher-server")
        self._proc.start()

    def wait_ready(self) -> None:
        """Block until the server has its teacher on the device and has answered one request of
        each lane size (a GPU's context, kernels and memory set up), so that a build's clock and its
        throughput start with the play; raises the server's failure."""
        state = self._shared.state.numpy()
        if not wait_until(lambda: state[2] or state[1], lambda: _running(self._proc.pid)) or state[1]:
            message = bytes(self._shared.error.numpy()).rstrip(b"\0").decode(errors="replace") or "it exited"
            raise RuntimeError(f"the teacher's inference server failed: {message}")

    def clients(self) -> list[ServerForward]:
        """One forward per lane, in the order of `lane_sizes`."""
        return [ServerForward(slot, self._shared, self._proc.pid) for slot in self._shared.slots]

    def close(self) -> None:
        self._shared.state[0] = 1
        stop_process(self._proc, timeout=10)


def _serve(net: torch.nn.Module, head: int, device: str, shared: _Shared, parent: int) -> None:
    """Server side: the teacher to the device, then answer requests, one lane's at a time, until asked to stop."""
    if not become_helper(parent):
        return
    state = shared.state.numpy()
    try:
        torch.set_num_threads(1)  # the lanes' env steps have the cores
        exact_fp32()  # a spawned process starts with torch's defaults (TF32 convolutions on a GPU)
        forward = NetForward(net.to(device).eval(), head)
        lanes = [(s.obs.numpy(), s.outputs.numpy(), s.seq.numpy()) for s in shared.slots]
        forward.warm_up({len(obs) for obs, _, _ in lanes}, lanes[0][0].shape[1:])
        state[2] = 1

        def pending() -> bool:
            return bool(state[0]) or any(seq[0] > seq[1] for _, _, seq in lanes)
        while wait_until(pending, lambda: os.getppid() == parent) and not state[0]:
            for obs, outputs, seq in lanes:
                if seq[0] > seq[1]:
                    outputs[:] = forward(obs)
                    seq[1] = seq[0]
    except Exception as e:  # noqa: BLE001 - every client raises it
        message = f"{type(e).__name__}: {e}".encode()[:ERROR_BYTES]
        shared.error.numpy()[:len(message)] = np.frombuffer(message, np.uint8)
        state[1] = 1
