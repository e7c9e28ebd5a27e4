"""Which device a config's `device` key names (auto, cpu, cuda): one rule for every trainer, the
recorder and evaluation; and how training updates run there (precision, memory layout)."""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

from multitask.errors import UserError

DeviceName = Literal["auto", "cpu", "cuda"]
DEVICE_DOC = "auto: cuda when torch sees a GPU, else cpu; the saved config holds the device used"


def pick_device(name: DeviceName) -> torch.device:
    """cuda (refused in one sentence without a GPU), cpu, or auto (cuda when torch sees a GPU)."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("cuda asked for as the device, but torch sees no CUDA GPU; ask for auto or cpu (device=... in a "
                        "config, --device on the command line)")
    exact_fp32()
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def exact_fp32() -> None:
    """fp32 means fp32 on a GPU too: torch runs cuDNN convolutions in TF32 by default (a 10-bit
    mantissa, relative error ~1e-3), which would round the teacher outputs a dataset stores past
    `dataset verify`'s 1e-4 and make "fp32" timings TF32 ones. Off for this process (a spawned
    one calls it again); `precision = bf16` is the fast setting, stated as such."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


# ---- how the training updates run on the device ------------------------------------------------

Precision = Literal["fp32", "bf16"]
PRECISION_DOC = ("fp32, or bf16: the training updates' forward passes under torch.autocast in bfloat16 (weights, "
                 "optimiser state and losses stay fp32; acting, evaluation and recording stay fp32)")
CHANNELS_LAST_DOC = "conv weights, and so activations, in channels-last (NHWC) memory layout: same values, another layout"


def autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager:
    """The context a training update's forward passes run in: torch.autocast(bfloat16) on the
    device for bf16; for fp32 no context at all, so that the fp32 path is exactly the plain one."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def arrange(net: torch.nn.Module, channels_last: bool) -> torch.nn.Module:
    """`net` with its 4-d weights in channels-last layout (convs then take and give NHWC, which
    tensor cores prefer), or unchanged. Values, state dicts and checkpoints are the same either way."""
    return net.to(memory_format=torch.channels_last) if channels_last else net
