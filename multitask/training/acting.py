"""One game's side of online DQN training: its vector env, its replay memory (frames stored once),
its exploration RNG and its episode returns. The single-game teacher has one (`training/teacher`),
the jointly trained multi-task DQN one per game (`training/baseline`); both act through `act`.

The env reports raw rewards and whole games (`envs/__init__`); what learning treats differently is
decided here (a lost life as terminal, for bootstrapping only) or by the learner (reward clipping).
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch

from multitask.agents.dqn import epsilon_greedy
from multitask.agents.networks import MultiHeadNet
from multitask.agents.replay import ReplayMemory
from multitask.envs import GameSpec, Step, VectorEnv, make_vector_env

RECENT_EPISODES = 20  # the training return logged is the mean over the last 20 finished episodes


class GamePlay:
    """A game's vector envs as an agent plays them: what they show now, env steps, and the raw
    whole-game returns of finished episodes. `Acting` (DQN: exploration and replay) builds on it;
    the student-driven trainer plays with it directly."""

    def __init__(self, game: GameSpec, num_envs: int):
        self.game, self.num_envs = game, num_envs
        self.env_steps, self.episodes = 0, 0
        self.recent: deque[float] = deque(maxlen=RECENT_EPISODES)  # raw whole-game returns
        self.episode_return = np.zeros(num_envs)
        self.env: VectorEnv | None = None
        self.obs: np.ndarray | None = None  # (N, *obs_shape) uint8: what the envs show now

    def begin(self, seed: int) -> None:
        """Fresh episodes in every env (env i seeded seed + i; the envs made on first use)."""
        if self.env is None:
            self.env = make_vector_env(self.game, self.num_envs)
        self.obs = self.env.reset(seed)
        self.episode_return[:] = 0.0

    def step(self, actions: np.ndarray) -> Step:
        """One vector step; counts steps and finished episodes."""
        step = self.env.step(actions)
        self.episode_return += step.reward
        for i in np.flatnonzero(step.done):
            self.recent.append(float(self.episode_return[i]))
            self.episode_return[i] = 0.0
            self.episodes += 1
        self.env_steps += self.num_envs
        self.obs = step.obs
        return step

    def mean_return(self) -> float:
        return float(np.mean(self.recent)) if self.recent else float("nan")

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None

class Acting(GamePlay):
    """A game's envs played epsilon-greedily by one head of a network, every transition stored.

    The replay memory is seeded with `seed`, the exploration RNG with seed + 1 (as the teacher has
    always done, so its runs stay bit-identical)."""

    def __init__(self, game: GameSpec, num_envs: int, replay_capacity: int, seed: int, life_loss_terminal: bool):
        super().__init__(game, num_envs)
        self.life_loss_terminal = life_loss_terminal
        self.memory = ReplayMemory(replay_capacity, num_envs, game.frame_shape, game.stack, seed=seed)
        self.rng = np.random.default_rng(seed + 1)  # exploration

    def begin(self, seed: int) -> None:
        super().begin(seed)
        self.memory.begin_episodes(self.obs)

    def act(self, net: MultiHeadNet, head: int, epsilon: float) -> None:
        """Act epsilon-greedily in every env (one batched forward pass on the network's device),
        store the transitions, count finished episodes."""
        device = next(net.parameters()).device
        with torch.no_grad():
            q = net(torch.from_numpy(self.obs).to(device), head).cpu()  # no-ops on the CPU
        actions = epsilon_greedy(q, epsilon, self.rng)
        step = self.step(actions)
        # a lost life ends the episode for bootstrapping only; the game (and its score) goes on
        terminal = step.life_lost if self.life_loss_terminal else step.terminated
        self.memory.add(actions, step.reward, terminal, step.next_obs, step.done, step.obs)

    def state_dict(self) -> dict:
        """Counts, replay and RNG states (env states cannot be saved: episodes restart on resume).
        The keys are those teachers' state.pt files have always had."""
        return {"env_steps": self.env_steps, "episodes": self.episodes, "replay": self.memory.state_dict(),
                "replay_rng": self.memory.rng.bit_generator.state, "action_rng": self.rng.bit_generator.state,
                "recent_returns": list(self.recent)}

    def load_state_dict(self, saved: dict) -> None:
        self.memory.load_state_dict(saved["replay"])
        self.memory.rng.bit_generator.state = saved["replay_rng"]
        self.rng.bit_generator.state = saved["action_rng"]
        self.env_steps, self.episodes = saved["env_steps"], saved["episodes"]
        self.recent.clear()
        self.recent.extend(saved["recent_returns"])
