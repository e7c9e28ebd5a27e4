"""Which device a config's `device` key names (auto, cpu, cuda): one rule for every trainer, the
recorder and evaluation."""

from __future__ import annotations

from typing import Literal

import torch

from multitask.errors import UserError

DeviceName = Literal["auto", "cpu", "cuda"]
DEVICE_DOC = "auto: cuda when torch sees a GPU, else cpu; the saved config holds the device used"


def pick_device(name: DeviceName) -> torch.device:
    """cuda (refused in one sentence without a GPU), cpu, or auto (cuda when torch sees a GPU)."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device = cuda but torch sees no CUDA GPU; use device=auto or device=cpu")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")
