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

import io
import json
import pickle
import warnings
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


# Lines of torch.load's messages that say nothing about the file (its weights_only preamble, its
# "please file an issue" and "check the documentation" notes, miniz's "likely corrupted" paragraph).
_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation",
                      "In PyTorch 2.6", "(1) In PyTorch", "(2) Alternatively",
                      "This file can still be loaded")


def torch_load_reason(e: Exception) -> str:
    """The informative clause of a torch.load failure, one short line without torch's boilerplate:
    'Unsupported operand 91', 'PytorchStreamReader failed reading zip archive: not a ZIP archive',
    'KeyError: 101' (what the pickle reader raises on most text)."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(_TORCH_BOILERPLATE)]
    first = lines[0].split(". ")[0].rstrip(".") if lines else ""
    if isinstance(e, EOFError):
        return "the file ends early"
    if not isinstance(e, (pickle.UnpicklingError, RuntimeError)):
        first = f"{type(e).__name__}: {first}" if first else type(e).__name__
    return first[:160] or type(e).__name__


def not_torch_file(head: bytes) -> str | None:
    """What the first bytes of a file say it is when it cannot be a torch file (None: it may be one;
    torch.load decides): 'empty (0 bytes)', 'a Git LFS pointer ...', 'a text file (it starts ...)'.
    A torch file is a zip (PK..) or a pickle (0x80 ..); text holds no NUL byte and decodes as UTF-8."""
    if not head:
        return "empty (0 bytes)"
    if head.startswith(b"version https://git-lfs.github.com/spec/"):
        return "a Git LFS pointer, not the file itself (run `git lfs pull`)"
    if head.startswith((b"PK\x03\x04", b"\x80")) or b"\x00" in head:
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3:  # not just a character cut off at the end of the sample
            return None
        text = head[:e.start].decode("utf-8")
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return f"a text file (it starts {first[:40]!r})" if first else "a text file of blank lines"


def torch_load(source: Path | bytes) -> Any:
    """torch.load(weights_only=True) onto the CPU; raises NotTorchFile for anything that is not a
    torch file. Any exception counts: the pickle reader raises KeyError, IndexError,
    UnicodeDecodeError and more on arbitrary bytes, and it only reads them (weights_only runs no
    code), so no bug of ours hides behind it."""
    head = source[:512] if isinstance(source, bytes) else _head(Path(source))
    sniffed = not_torch_file(head)
    if sniffed:
        raise NotTorchFile(sniffed, sniffed=True)
    try:
        with warnings.catch_warnings():  # on stray bytes torch warns of an unknown pickle protocol first
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(io.BytesIO(source) if isinstance(source, bytes) else source,
                              map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - see the docstring
        raise NotTorchFile(torch_load_reason(e), sniffed=False) from None


class NotTorchFile(Exception):
    """A file (or bytes) that torch.load cannot read; `why` is one short clause, `sniffed` says it was
    recognised from its first bytes (empty, LFS pointer, text) rather than by torch.load failing."""

    def __init__(self, why: str, sniffed: bool):
        super().__init__(why)
        self.why, self.sniffed = why, sniffed


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(512)


def _read_payload(path: Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a directory, not a .pt file; pass the checkpoint file "
                        f"(a run folder's best.pt)")
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; check the path")
    try:
        payload = torch_load(path)
    except NotTorchFile as e:
        if e.sniffed:
            raise UserError(f"{path} is not a multitask checkpoint: it is {e.why}; pass a .pt file "
                            f"written by teacher train, student train or teacher import") from None
        raise UserError(f"checkpoint {path} is corrupt or not a torch file (torch.load failed: "
                        f"{e.why}); re-download or retrain it") from None
    except OSError as e:
        raise UserError(f"checkpoint {path} cannot be read ({e.strerror or e}); check its permissions") from None
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
