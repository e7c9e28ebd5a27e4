"""Agent checkpoints: one file format for teachers, students and the multi-task DQN.

`<name>.pt` is a torch file holding a plain dict (loaded with `weights_only=True`, so a foreign
pickle can never run code):

    format "multitask-agent", format_version, kind ("teacher" | "student" | "multitask-dqn"),
    network (NetworkSpec as a dict), state_dict, card (provenance, see below)

`<name>.json` beside it is the human-readable card: the same card plus the file's sha256. The card
holds the full config, the env spec of every game (preprocessing, action meanings), the eval
result, env steps, wall time and the package version, so that every number traces back to a
command.
"""

from __future__ import annotations

from collections import OrderedDict

import json
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import multitask
from multitask.envs import GameSpec, get_game
from multitask.errors import UserError
from multitask.files import atomic_torch_save, atomic_write_text, file_sha256
from multitask.agents.networks import MultiHeadNet, NetworkSpec

FORMAT = "multitask-agent"
FORMAT_VERSION = 1
KINDS = ("teacher", "student", "multitask-dqn")
# No trained network has weights near 1e6: PyTorch initialises every layer with |w| <= 1/sqrt(fan_in)
# <= 1, and a DQN's targets are bounded by r_max / (1 - gamma) = 100 (rewards clipped to [-1, 1],
# gamma 0.99; Mnih et al. 2015), so its weights stay O(1) (the largest in teachers/minatar: 3.2);
# a weight of 1e6 turns a [0, 1] input into a pre-activation of 1e6. Random bytes decode as
# float32 to |x| > 1e6 about 42% of the time (exponents 2^20..2^127: 108 of 256 codes) but to NaN
# or inf 1 time in 256, so this bound, more than the NaN check, catches a few corrupted bytes.
MAX_ABS_WEIGHT = 1e6


@dataclass
class Agent:
    net: MultiHeadNet
    kind: str
    card: dict[str, Any]
    path: Path
    sha256: str


def card_path(path: Path) -> Path:
    return path.with_suffix(".json")


def save_agent(path: Path, net: MultiHeadNet, kind: str, card: dict[str, Any]) -> str:
    """Write the checkpoint and its card; returns the checkpoint's sha256."""
    if kind not in KINDS:
        raise ValueError(f"unknown agent kind {kind}")
    card = {**card, "kind": kind, "package_version": multitask.__version__,
            "torch_version": str(torch.__version__), "network": net.spec.to_dict()}
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind,
               "network": net.spec.to_dict(), "state_dict": _cpu_state_dict(net), "card": card}
    atomic_torch_save(payload, path)
    digest = file_sha256(path)
    atomic_write_text(card_path(path), json.dumps({**card, "sha256": digest}, indent=2) + "\n")
    return digest


def _cpu_state_dict(net: MultiHeadNet) -> dict[str, torch.Tensor]:
    """The net's state dict with every tensor on the CPU (a net trained on a GPU loads anywhere); a
    CPU net's own state dict as it is, so that its file's bytes do not change."""
    sd = net.state_dict()
    if all(v.device.type == "cpu" for v in sd.values()):
        return sd
    cpu = OrderedDict((k, v.cpu()) for k, v in sd.items())
    cpu._metadata = getattr(sd, "_metadata", None)
    return cpu


def weights_problem(state_dict: dict[str, torch.Tensor]) -> str | None:
    """What no trained network holds, named with its tensor (None: nothing found): a NaN or an
    infinity, or a weight beyond MAX_ABS_WEIGHT in magnitude. Integer tensors are not weights."""
    for name, tensor in state_dict.items():
        if not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            return f"{bad} NaN or infinite weight(s) in {name}"
        peak = float(tensor.abs().max())
        if peak > MAX_ABS_WEIGHT:
            return f"a weight of {peak:.2g} in {name}, beyond any trained network's {MAX_ABS_WEIGHT:.0e}"
    return None


def _reason(e: Exception) -> str:
    """The informative line of a torch.load failure (its first line is boilerplate)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if "Unpickler error" in ln:
            return ln[:160]
    return lines[0][:160] if lines else type(e).__name__


def _read_payload(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; check the path")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise UserError(f"checkpoint {path} is corrupt or not a torch file ({_reason(e)}); "
                        f"re-download or retrain it") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{path} is not a multitask agent checkpoint (for CleanRL or "
                        f"Stable-Baselines3 files use `multitask teacher import`)")
    if payload.get("format_version") != FORMAT_VERSION:
        raise UserError(f"checkpoint {path} has format version {payload.get('format_version')}, this "
                        f"package reads version {FORMAT_VERSION}; convert or retrain it")
    return payload


def load_agent(path: Path) -> Agent:
    """Load any agent checkpoint; every problem with the file is a one-sentence UserError."""
    path = Path(path)
    payload = _read_payload(path)
    try:
        spec = NetworkSpec.from_dict(payload["network"])
        net = MultiHeadNet(spec)
        net.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, RuntimeError, ValueError) as e:
        raise UserError(f"checkpoint {path} is damaged: its weights do not match its network "
                        f"description ({str(e).splitlines()[0][:120]}); retrain or re-import it") from None
    problem = weights_problem(payload["state_dict"])
    if problem:
        raise UserError(f"checkpoint {path} holds {problem} (a corrupt file or a diverged training); "
                        f"re-download, re-import or retrain it")
    net.eval()
    return Agent(net=net, kind=payload["kind"], card=payload.get("card", {}), path=path,
                 sha256=file_sha256(path))


def check_agent_game(agent: Agent, game: GameSpec) -> int:
    """Head index of `game` in `agent`, after checking that the head fits the game's action set."""
    if game.name not in agent.net.games:
        raise UserError(f"checkpoint {agent.path} has no head for {game.name} (it plays "
                        f"{', '.join(agent.net.games)}); pass one of those games or another checkpoint")
    head = agent.net.head_index(game.name)
    n = agent.net.spec.num_actions[head]
    if n != game.num_actions:
        raise UserError(f"checkpoint {agent.path} has {n} actions for {game.name}, but the game has "
                        f"{game.num_actions} legal actions; it was made for another action set")
    expected_channels = agent.net.spec.trunk.in_channels
    if game.obs_shape[0] > expected_channels or game.obs_shape[1] != agent.net.spec.trunk.in_size:
        raise UserError(f"checkpoint {agent.path} takes {expected_channels}x{agent.net.spec.trunk.in_size}"
                        f" inputs, which {game.name} observations {game.obs_shape} do not fit")
    return head


def load_teacher(path: Path, game: str | GameSpec | None = None) -> tuple[Agent, GameSpec]:
    """Load a single-game checkpoint and check it against `game` (default: the game it names)."""
    agent = load_agent(path)
    if game is None:
        if len(agent.net.games) != 1:
            raise UserError(f"checkpoint {path} plays {len(agent.net.games)} games; say which with --games")
        game = agent.net.games[0]
    spec = get_game(game) if isinstance(game, str) else game
    check_agent_game(agent, spec)
    return agent, spec
