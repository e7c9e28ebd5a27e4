"""The processes of a `torchrun` job: which one this is, its device, and the few collective calls
trainers make. A plain run is one process; then nothing is set up and every call here is a no-op.

DistributedDataParallel over NCCL on GPUs and gloo on CPUs; rank 0 evaluates, logs and writes.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from multitask.devices import DeviceName, pick_device
from multitask.errors import UserError

# Rank 0 evaluates whole games while the other ranks wait in their next collective call; torch's
# default of 10 minutes would end the job during a long Atari evaluation.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)


@dataclass(frozen=True)
class Processes:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        """The process that evaluates, logs and writes files."""
        return self.rank == 0


def start_processes(device: DeviceName = "auto") -> Processes:
    """Join the torchrun job named by the environment (WORLD_SIZE, LOCAL_RANK), if there is one.
    On GPUs each process takes cuda:LOCAL_RANK (NCCL); a job with more processes per machine than
    GPUs is refused in one sentence, and device = cpu runs every process on the CPU (gloo) whatever
    the machine has."""
    chosen = pick_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Processes(0, 1, chosen)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if chosen.type == "cuda" and local >= torch.cuda.device_count():
        raise UserError(f"torchrun started process {local} on a machine with {torch.cuda.device_count()} GPU(s); "
                        f"start at most one process per GPU, or pass device=cpu")
    dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
    if chosen.type == "cuda":
        torch.cuda.set_device(local)
        return Processes(dist.get_rank(), world, torch.device("cuda", local))
    return Processes(dist.get_rank(), world, torch.device("cpu"))


def _joined() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    """Wait until every process gets here."""
    if _joined():
        dist.barrier()


def gather(value: Any) -> list[Any]:
    """Every process's `value`, in rank order, on every process."""
    if not _joined():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def average(values: list[float], device: torch.device) -> list[float]:
    """The mean over processes of each value (the values themselves in one process): one
    all-reduce of a small float64 tensor on `device` (NCCL needs the GPU's)."""
    if not _joined():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def stop() -> None:
    """Leave the job once every process has finished."""
    if _joined():
        dist.barrier()
        dist.destroy_process_group()


def replicate(net: nn.Module, find_unused_parameters: bool) -> nn.Module:
    """`net` wrapped for gradient all-reduce when there are several processes, else `net` itself.
    find_unused_parameters: some parameters (other games' heads) get no gradient in a step."""
    if not _joined():
        return net
    return nn.parallel.DistributedDataParallel(net, find_unused_parameters=find_unused_parameters)


def checksum(net: nn.Module) -> float:
    """sum_i (i + 1) * sum(p_i) over the parameters p_i in order, in float64: equal on replicas
    that hold the same weights, and unlikely to be equal otherwise (the weighting catches swaps)."""
    return float(sum(p.detach().double().sum().item() * (i + 1) for i, p in enumerate(net.parameters())))
