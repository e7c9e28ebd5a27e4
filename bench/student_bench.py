"""Student training fed from HDF5 vs fed from the same data already in memory, same run.

For MinAtar and Atari sizes it trains the same student (100% of a teacher) with the same batch
size for the same time, twice:
  in-memory  all stacked observations and teacher outputs preloaded as torch tensors, batches by
             indexing them (the limit: no I/O, no decompression, no stacking);
  HDF5       the project's loader (`multitask.data.loader`) reading the dataset file, batches prepared in
             a background worker process;
and prints samples/s of both and their ratio (goal >= 0.9). Then it runs the loader with a memory
budget of a quarter of the dataset's frames (chunk windows) and prints samples/s and the peak
resident memory of the loader worker against the budget and the dataset size.

On a GPU (--device cuda) the in-memory limit's tensors live on the GPU already (no transfer at all)
and the loader's batches are copied there as the trainer copies them.

With --layouts it also trains the in-memory student in bf16 autocast, in channels-last layout and in
both, and prints each one's samples/s against fp32's (the `precision` and `channels_last` keys): each
variant and fp32 in 3 interleaved rounds, the median of the per-round ratios and their range; the
in-memory limit is then fp32's median.

    python bench/student_bench.py [--suite minatar|atari|all] [--seconds 20] [--device auto|cpu|cuda] [--batch B] [--layouts]
"""

from __future__ import annotations

import argparse
import copy
import functools
import multiprocessing
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from multitask.agents.checkpoints import save_agent
from multitask.devices import Precision, arrange, autocast, pick_device
from multitask.envs import get_game
from multitask.data.loader import LoaderSpec, make_loader
from multitask.training.losses import kl_loss
from multitask.agents.networks import MultiHeadNet, teacher_network_spec
from multitask.data.build import build_dataset
from multitask.data.build_config import DatasetConfig
from multitask.data.reader import DatasetReader

from interleave import ROUNDS, describe, interleaved_ratios

LAYOUTS = (("bf16", "bf16", False), ("channels-last", "fp32", True), ("both", "bf16", True))  # name, precision, NHWC
SETTINGS = {  # game, dataset steps, batch size
    "minatar": ("minatar/Breakout", 100_000, 256),
    "atari": ("atari/Breakout", 20_000, 64),
}


def teacher_path(game_name: str, tmp: Path) -> Path:
    suite, name = game_name.split("/")
    trained = Path("teachers") / suite / f"{name}.pt"
    if trained.exists():
        return trained
    torch.manual_seed(0)
    save_agent(tmp / "t.pt", MultiHeadNet(teacher_network_spec(get_game(game_name))), "teacher", {"source": "bench"})
    return tmp / "t.pt"


def children_private_bytes() -> int:
    """Private (not shared with the parent) resident memory of this process's children."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) != os.getpid():
                    continue
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith(("Private_Clean:", "Private_Dirty:")):
                        total += int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            continue
    return total


def wait_for_children(timeout: float = 30.0) -> None:
    """Until this process has no child processes left (or `timeout` seconds)."""
    end = time.perf_counter() + timeout
    while multiprocessing.active_children() and time.perf_counter() < end:
        time.sleep(0.05)


class PeakMemory:
    """Polls children_private_bytes() in a thread; .peak is the largest value seen."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, children_private_bytes())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def train_for(seconds: float, batches, net: MultiHeadNet, precision: Precision = "fp32") -> float:
    """Samples/s of KL distillation updates drawn from `batches` (an iterator of (obs, q)), on the
    net's device (batches copied there as the student trainer copies them), forward passes in
    `precision` as the student trainer runs them."""
    opt = torch.optim.RMSprop(net.parameters(), lr=1e-4)
    device = next(net.parameters()).device

    def step(obs, q):
        with autocast(device, precision):
            out = net(obs.to(device, non_blocking=True), 0)
        loss = kl_loss(out.float(), q.to(device, non_blocking=True), 0.01)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    def sync() -> None:  # a GPU runs behind the Python that queues its work: time what it has done
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    for _ in range(3):  # warm up (and let loader workers start)
        step(*next(batches))
    sync()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        obs, q = next(batches)
        step(obs, q)
        n += len(obs)
    sync()
    return n / (time.perf_counter() - t0)


def bench_suite(suite: str, seconds: float, device_name: str = "cpu", batch_size: int = 0, layouts: bool = False) -> None:
    device = pick_device(device_name)
    game_name, steps, batch = SETTINGS[suite]
    batch = batch_size or batch
    game = get_game(game_name)
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        tmp = Path(tmp)
        path = tmp / "d.h5"
        build_dataset(game_name, teacher_path(game_name, tmp), path, DatasetConfig(steps=steps), show_progress=False)
        with DatasetReader(path) as d:
            frames_bytes = d.frames_nbytes
            all_obs = torch.from_numpy(d.obs(np.arange(len(d))))  # (N, C, H, W) uint8: the in-memory limit
            all_q = torch.from_numpy(d.steps["teacher_outputs"].copy())

        def memory_batches(obs: torch.Tensor, q: torch.Tensor):
            gen = torch.Generator(obs.device).manual_seed(0)
            while True:  # indices drawn where the tensors are: no copy, no wait for the GPU
                idx = torch.randint(0, len(q), (batch,), device=obs.device, generator=gen)
                yield obs[idx], q[idx]

        def loader_batches(budget: int):
            spec = LoaderSpec((str(path),), batch, "per_game", seed=0, channels=game.obs_shape[0],
                              memory_budget=budget, workers=1, window_batches=200, pin_memory=device.type == "cuda")
            it = make_loader(spec)
            try:
                for b in it:
                    yield b.obs, b.teacher[0]
            finally:
                it.close()  # stop prefetching before the next measurement
                wait_for_children()  # a worker still exiting would count in the next peak

        torch.manual_seed(0)
        net = MultiHeadNet(teacher_network_spec(game)).to(device)
        all_obs, all_q = all_obs.to(device), all_q.to(device)  # the limit: data already where the net is
        batches = memory_batches(all_obs, all_q)
        variants = {}  # name -> per-round ratios to fp32 of the in-memory limit in bf16 and channels-last
        if layouts:  # (the config keys precision, channels_last), each beside fp32 in interleaved rounds
            nets = {"fp32": (net, "fp32")}
            nets.update({name: (arrange(copy.deepcopy(net), nhwc), precision) for name, precision, nhwc in LAYOUTS})
            fp32_rates, variants = interleaved_ratios(
                {name: functools.partial(train_for, max(1.0, seconds / ROUNDS), batches, variant, precision)
                 for name, (variant, precision) in nets.items()}, "fp32")
            mem_rate = float(np.median(fp32_rates))
        else:
            mem_rate = train_for(seconds, batches, net)
        batches.close()
        del all_obs, batches
        with PeakMemory() as full:
            batches = loader_batches(1 << 34)
            h5_rate = train_for(seconds, batches, net)
            batches.close()
        budget = frames_bytes // 4
        with PeakMemory() as windowed:
            batches = loader_batches(budget)
            window_rate = train_for(seconds, batches, net)
            batches.close()

    print(f"\n== {game_name} on {device}: student {sum(p.numel() for p in net.parameters()):,} parameters, batch {batch}, "
          f"torch threads {torch.get_num_threads()}, dataset {steps:,} steps ({frames_bytes / 2**20:.0f} MiB of frames)")
    print(f"  in-memory tensors          {mem_rate:10,.0f} samples/s")
    for name, ratios in variants.items():
        print(f"  in-memory, {name:<14}  {describe(ratios, 'fp32')}")
    print(f"  HDF5 loader (frames in RAM){h5_rate:10,.0f} samples/s -> ratio {h5_rate / mem_rate:.2f} (goal >= 0.9)")
    print(f"  HDF5 loader, budget 1/4    {window_rate:10,.0f} samples/s -> ratio {window_rate / mem_rate:.2f}")
    print(f"  loader worker peak private memory: {full.peak / 2**20:.0f} MiB with all frames in RAM, "
          f"{windowed.peak / 2**20:.0f} MiB under a {budget / 2**20:.0f} MiB budget "
          f"(frames {frames_bytes / 2**20:.0f} MiB)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", choices=("minatar", "atari", "all"), default="all")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    p.add_argument("--batch", type=int, default=0, help="batch size (default: the suite's)")
    p.add_argument("--layouts", action="store_true", help="also the in-memory limit in bf16 and channels-last")
    args = p.parse_args()
    for suite in ("minatar", "atari") if args.suite == "all" else (args.suite,):
        bench_suite(suite, args.seconds, args.device, args.batch, args.layouts)


if __name__ == "__main__":
    main()
