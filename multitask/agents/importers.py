"""Import public Atari DQN checkpoints (CleanRL, Stable-Baselines3 / RL Zoo) as teachers.

Both are the Nature CNN on 4 stacked 84x84 grayscale frames (oldest first, as our env gives them)
with input / 255 inside the network, and the game's minimal action set, so they map one to one
onto our `MultiHeadNet` (trunk.convs.{0,2,4}, trunk.fcs.0, heads.0). Nothing is unpickled beyond
tensors: CleanRL files and SB3's policy.pth load with `weights_only=True`, SB3's `data` is JSON.

Preprocessing note: these agents were trained on `<Game>NoFrameskip-v4` with gymnasium/SB3 wrappers
(OpenCV INTER_AREA resize); our env is ale-py's vector env with the same settings but its own
resize, so pixel values can differ slightly. Evaluate an imported teacher (`--episodes`) before
relying on it.
"""

from __future__ import annotations

import json
import zipfile
import zlib
from pathlib import Path
from typing import Literal

from multitask.config import command_line
from multitask.agents.checkpoints import NotTorchFile, save_agent, torch_load, weights_problem
from multitask.files import file_sha256
from multitask.envs import GameSpec
from multitask.errors import UserError
from multitask.evaluation.protocol import evaluate_game
from multitask.agents.networks import MultiHeadNet, teacher_network_spec

# source key prefix -> our key prefix
CLEANRL_KEYS = {"network.0.": "trunk.convs.0.", "network.2.": "trunk.convs.2.",
                "network.4.": "trunk.convs.4.", "network.7.": "trunk.fcs.0.", "network.9.": "heads.0."}
SB3_KEYS = {"q_net.features_extractor.cnn.0.": "trunk.convs.0.",
            "q_net.features_extractor.cnn.2.": "trunk.convs.2.",
            "q_net.features_extractor.cnn.4.": "trunk.convs.4.",
            "q_net.features_extractor.linear.0.": "trunk.fcs.0.", "q_net.q_net.0.": "heads.0."}


def _torch_load(data: bytes | Path, what: str) -> dict:
    try:
        obj = torch_load(data)
    except NotTorchFile as e:
        if e.sniffed:
            raise UserError(f"{what} is not a PyTorch checkpoint: it is {e.why}; pass the model file "
                            f"CleanRL wrote (e.g. dqn_atari.cleanrl_model) or Stable-Baselines3's .zip") from None
        raise UserError(f"{what} is not a readable PyTorch state_dict (torch.load failed: {e.why})") from None
    except OSError as e:
        raise UserError(f"{what} cannot be read ({e.strerror or e}); check its permissions") from None
    if not isinstance(obj, dict):
        raise UserError(f"{what} holds a {type(obj).__name__}, not a state_dict")
    return obj


def _remap(source: dict, mapping: dict[str, str], what: str, fmt: str) -> dict:
    """Our state_dict from the source's, after checking that every tensor is there and sane."""
    renamed = {}
    for src_prefix, dst_prefix in mapping.items():
        for suffix in ("weight", "bias"):
            key = src_prefix + suffix
            if key not in source:
                raise UserError(f"{what} is not a {fmt} Nature-DQN checkpoint (it has no '{key}'); "
                                f"check the file and the format argument")
            renamed[key] = dst_prefix + suffix
    problem = weights_problem({key: source[key] for key in renamed})
    if problem:
        raise UserError(f"{what} holds {problem}, so the file is corrupt; download or export it again")
    return {ours: source[key] for key, ours in renamed.items()}


def _zip_names(path: Path) -> set[str]:
    """The entries of a zip file (torch.save writes zips too), or none for any other file."""
    try:
        with zipfile.ZipFile(path) as z:
            return set(z.namelist())
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error):
        return set()


def read_cleanrl(path: Path) -> dict:
    """CleanRL dqn_atari.py: torch.save(q_network.state_dict()) of an nn.Sequential."""
    if "policy.pth" in _zip_names(path):
        raise UserError(f"{path} is a Stable-Baselines3 model, not a CleanRL one; import it with "
                        f"`multitask teacher import sb3`")
    return _remap(_torch_load(path, f"{path}"), CLEANRL_KEYS, f"{path}", "CleanRL")


def read_sb3(path: Path) -> dict:
    """Stable-Baselines3 DQN zip: policy.pth holds q_net.* (and q_net_target.*); data is JSON."""
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
            if "policy.pth" not in names:
                if any(n.endswith("/data.pkl") for n in names):  # torch.save's own zip layout
                    raise UserError(f"{path} is a PyTorch state_dict (CleanRL's format), not a Stable-Baselines3 "
                                    f"model; import it with `multitask teacher import cleanrl`")
                raise UserError(f"{path} is a zip without policy.pth, not a Stable-Baselines3 model")
            policy = z.read("policy.pth")
            data = json.loads(z.read("data")) if "data" in names else {}
    except zipfile.BadZipFile as e:
        what = f"a damaged zip ({e})" if zipfile.is_zipfile(path) else "not a zip file"
        raise UserError(f"{path} is {what}; Stable-Baselines3 models are .zip archives") from None
    except (zlib.error, EOFError) as e:
        raise UserError(f"{path} is a damaged zip ({type(e).__name__}); download or export it again") from None
    except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(f"{path} holds a 'data' entry that is not JSON ({str(e)[:80]}), so it is not "
                        f"a Stable-Baselines3 model") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a 'data' entry that is not a JSON object, so it is not a "
                        f"Stable-Baselines3 model")
    policy_kwargs = data.get("policy_kwargs") or {}
    if isinstance(policy_kwargs, dict) and policy_kwargs.get("normalize_images") is False:
        raise UserError(f"{path} was trained without image normalisation; only the default "
                        f"(input / 255) is supported")
    return _remap(_torch_load(policy, f"{path}:policy.pth"), SB3_KEYS, f"{path}", "Stable-Baselines3")


def convert(fmt: Literal["cleanrl", "sb3"], path: Path, game: GameSpec) -> MultiHeadNet:
    """A teacher network for `game` with the weights of the checkpoint at `path`."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a directory; pass the CleanRL .pt or the "
                        f"Stable-Baselines3 .zip file")
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; check the path")
    state = read_cleanrl(path) if fmt == "cleanrl" else read_sb3(path)
    n_actions = state["heads.0.weight"].shape[0]
    if n_actions != game.num_actions:
        raise UserError(f"{path} outputs {n_actions} actions but {game.name} has {game.num_actions} "
                        f"legal actions; it was trained on another game or the full action set")
    net = MultiHeadNet(teacher_network_spec(game))
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{path} has layer shapes that are not the Nature DQN's "
                        f"({str(e).splitlines()[-1].strip()[:120]})") from None
    return net.eval()


def import_teacher(fmt: Literal["cleanrl", "sb3"], path: Path, game: GameSpec, out: Path,
                   evaluate_episodes: int = 0, seed: int = 12345,
                   show_progress: bool = True) -> dict:
    net = convert(fmt, path, game)
    card = {
        "source": "imported", "import": {"format": fmt, "file": str(path), "sha256": file_sha256(path)},
        "game": game.describe(), "config": None, "env_steps": None,
        "parameters": sum(p.numel() for p in net.parameters()), "command": command_line(),
    }
    if evaluate_episodes > 0:
        card["eval"] = evaluate_game(net, game, evaluate_episodes, seed, show_progress=show_progress).to_dict()
    digest = save_agent(out, net, "teacher", card)
    score = f", score {card['eval']['mean']:.1f}" if "eval" in card else ""
    print(f"imported {fmt} teacher for {game.name} from {path}{score} -> {out} (sha256 {digest[:12]})")
    return card
