"""Importing CleanRL and Stable-Baselines3 DQN checkpoints built locally in their real layouts."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch import nn

from multitask.agents.checkpoints import load_teacher
from multitask.envs import get_game, make_vector_env
from multitask.errors import UserError
from multitask.agents.importers import import_teacher


def _real_observations(game, n=16):
    env = make_vector_env(game, 4)
    obs = [env.reset(seed=0)]
    rng = np.random.default_rng(0)
    for _ in range(n // 4 - 1):
        obs.append(env.step(rng.integers(0, game.num_actions, 4)).obs)
    env.close()
    return np.concatenate(obs)


class CleanRLQNetwork(nn.Module):
    """cleanrl/dqn_atari.py's QNetwork, as published."""

    def __init__(self, n):
        super().__init__()
        self.network = nn.Sequential(
            nn.Conv2d(4, 32, 8, stride=4), nn.ReLU(), nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(), nn.Flatten(), nn.Linear(3136, 512), nn.ReLU(),
            nn.Linear(512, n))

    def forward(self, x):
        return self.network(x / 255.0)


def test_cleanrl_import_gives_identical_q_values(tmp_path):
    game = get_game("atari/Pong")
    torch.manual_seed(0)
    source = CleanRLQNetwork(game.num_actions)
    path = tmp_path / "dqn_atari.cleanrl_model"
    torch.save(source.state_dict(), path)
    import_teacher("cleanrl", path, game, tmp_path / "Pong.pt")
    agent, _ = load_teacher(tmp_path / "Pong.pt", "atari/Pong")
    obs = torch.from_numpy(_real_observations(game))
    with torch.no_grad():
        assert torch.allclose(agent.net(obs), source(obs.float()), atol=1e-5)
    assert agent.card["import"]["format"] == "cleanrl"


def test_sb3_import_gives_identical_q_values(tmp_path):
    from stable_baselines3 import DQN

    game = get_game("atari/Breakout")

    class AtariShaped(gym.Env):  # what SB3's AtariWrapper + frame stack hand to DQN: (84, 84, 4)
        observation_space = gym.spaces.Box(0, 255, (84, 84, 4), np.uint8)
        action_space = gym.spaces.Discrete(game.num_actions)

        def reset(self, seed=None, options=None):
            return self.observation_space.sample(), {}

        def step(self, action):
            return self.observation_space.sample(), 0.0, False, False, {}

    model = DQN("CnnPolicy", AtariShaped(), buffer_size=10, learning_starts=0, device="cpu", seed=0)
    path = tmp_path / "dqn-BreakoutNoFrameskip-v4.zip"
    model.save(path)
    with pytest.raises(UserError, match="is a Stable-Baselines3 model, not a CleanRL one.*teacher import sb3"):
        import_teacher("cleanrl", path, game, tmp_path / "Breakout.pt")
    import_teacher("sb3", path, game, tmp_path / "Breakout.pt")
    agent, _ = load_teacher(tmp_path / "Breakout.pt")
    obs = torch.from_numpy(_real_observations(game))  # (B, 4, 84, 84): SB3 sees it transposed the same way
    with torch.no_grad():
        expected = model.q_net(obs)  # q_net normalises uint8 images by 255 itself
        assert torch.allclose(agent.net(obs), expected, atol=1e-5)


def test_import_refuses_wrong_action_count_and_foreign_files(tmp_path):
    path = tmp_path / "pong.cleanrl_model"
    torch.save(CleanRLQNetwork(6).state_dict(), path)
    with pytest.raises(UserError, match="outputs 6 actions but atari/Breakout has 4"):
        import_teacher("cleanrl", path, get_game("atari/Breakout"), tmp_path / "x.pt")
    with pytest.raises(UserError, match=r"is a PyTorch state_dict \(CleanRL's format\).*teacher import cleanrl"):
        import_teacher("sb3", path, get_game("atari/Pong"), tmp_path / "x.pt")
    other = tmp_path / "other.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(UserError, match="not a CleanRL Nature-DQN checkpoint"):
        import_teacher("cleanrl", other, get_game("atari/Pong"), tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize("corruption", ["random", "ones"])
def test_corrupted_cleanrl_file_is_refused_and_nothing_is_written(tmp_path, run_cli, corruption):
    """2,000 overwritten bytes inside the weights: random ones decode to floats up to ~1e38, all-ones
    bytes to NaN. Either way the import stops with one sentence and writes no teacher."""
    torch.manual_seed(0)
    path = tmp_path / "dqn_atari.cleanrl_model"
    torch.save(CleanRLQNetwork(6).state_dict(), path)
    data = bytearray(path.read_bytes())
    start = len(data) // 2  # inside network.7.weight (3136 x 512 floats, most of the file)
    noise = np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes()
    data[start:start + 2000] = noise if corruption == "random" else b"\xff" * 2000
    path.write_bytes(bytes(data))
    out = tmp_path / "Pong.pt"
    code, _, err = run_cli("teacher", "import", "cleanrl", path, "--game", "atari/Pong", "--out", out)
    assert code == 2 and str(path) in err and "network.7.weight" in err and err.count("\n") == 1, err
    assert not out.exists() and not out.with_suffix(".json").exists()
