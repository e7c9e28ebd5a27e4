"""DQN learning: targets and loss as pure functions, and a learner that owns the networks.

Shared by single-game teacher training (`multitask.training.teacher`) and, with one head per game, the
multi-task DQN baseline. The learner knows nothing of envs; it updates on `ReplayBatch`es.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from multitask.config import option
from multitask.agents.networks import MultiHeadNet
from multitask.agents.replay import ReplayBatch
from multitask.devices import Precision, autocast


@dataclass(frozen=True)
class DQNConfig:
    gamma: float = option(0.99, "discount factor (Mnih et al. 2015)")
    lr: float = option(1e-4, "Adam learning rate (CleanRL dqn_atari; Nature DQN used RMSProp 2.5e-4)")
    adam_eps: float = option(1.5e-4, "Adam epsilon (Hessel et al. 2018, Rainbow)")
    batch_size: int = option(32, "minibatch size (Mnih et al. 2015)")
    double: bool = option(True, "Double-DQN targets (van Hasselt et al. 2016); false: max over target net")
    target_update_every: int = option(2000, "gradient updates between target-network copies (Dopamine DQN: 8,000 agent steps at one update per 4 steps)")
    huber_delta: float = option(1.0, "Huber loss threshold (Mnih et al. 2015 clip the TD error to [-1, 1])")
    max_grad_norm: float = option(10.0, "global gradient-norm clip (Dopamine/SB3 use 10); 0 disables")
    reward_clip: bool = option(True, "clip rewards to [-1, 1] for learning (Mnih et al. 2015); scores stay raw")

    def __post_init__(self):
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError("gamma must be in [0, 1]")
        if self.batch_size < 1 or self.target_update_every < 1:
            raise ValueError("batch_size and target_update_every must be positive")
        if self.lr <= 0 or self.huber_delta <= 0:
            raise ValueError("lr and huber_delta must be positive")


def td_targets(reward: torch.Tensor, terminal: torch.Tensor, next_q_target: torch.Tensor,
               next_q_online: torch.Tensor | None, gamma: float) -> torch.Tensor:
    """One-step TD targets, (B,) from (B,) rewards/terminals and (B, A) next-state Q-values.

    Double DQN (next_q_online given):  y = r + gamma (1 - d) Q_target(s', argmax_a Q_online(s', a))
    DQN (next_q_online is None):       y = r + gamma (1 - d) max_a Q_target(s', a)
    """
    if next_q_online is None:
        bootstrap = next_q_target.max(dim=1).values
    else:
        best = next_q_online.argmax(dim=1, keepdim=True)
        bootstrap = next_q_target.gather(1, best).squeeze(1)
    return reward + gamma * (1.0 - terminal) * bootstrap


def td_loss(q: torch.Tensor, action: torch.Tensor, target: torch.Tensor, delta: float = 1.0) -> torch.Tensor:
    """Huber(Q(s, a) - y) with threshold delta, averaged over the batch. q: (B, A), action/target: (B,)."""
    q_taken = q.gather(1, action.unsqueeze(1)).squeeze(1)
    return F.huber_loss(q_taken, target, delta=delta, reduction="mean")


def epsilon_greedy(q: torch.Tensor | np.ndarray, epsilon: float, rng: np.random.Generator) -> np.ndarray:
    """Greedy actions from (N, A) values, each replaced by a uniform action with prob epsilon."""
    actions = q.argmax(1)  # dim 1 of a tensor, axis 1 of an array
    actions = actions.numpy() if isinstance(actions, torch.Tensor) else actions
    explore = rng.random(len(actions)) < epsilon
    if explore.any():
        actions = actions.copy()
        actions[explore] = rng.integers(0, q.shape[1], int(explore.sum()))
    return actions


def grouped_mean(values: Sequence[torch.Tensor]) -> torch.Tensor:
    """(1/G) sum_g values_g: each game's (already row-averaged) loss weighs 1/G, however many rows
    it had. Of one value, that value exactly (its gradient is multiplied by 1.0)."""
    return torch.stack(list(values)).mean()


def linear_schedule(start: float, end: float, duration: int, t: int) -> float:
    """start -> end linearly over `duration` steps, then constant."""
    if duration <= 0:
        return end
    return start + (end - start) * min(t / duration, 1.0)


class DQNLearner:
    """Online and target networks, Adam, and the update rule."""

    def __init__(self, net: MultiHeadNet, cfg: DQNConfig, precision: Precision = "fp32"):
        self.net, self.cfg, self.precision = net, cfg, precision
        self.target = copy.deepcopy(net).requires_grad_(False)
        # fused: one kernel over every parameter instead of a loop of per-tensor ops. Same Adam rule
        # (rounding may differ in the last bit); measured 1.11-1.17x per update of the five-game
        # multi-task DQN on the 2-core CPU (10.5 -> 9.4 ms idle; the Adam step 1.17 -> 0.32 ms), and
        # torch's fastest on a GPU. `python bench/teacher_throughput.py --suite minatar --layouts` measures it.
        self.optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr, eps=cfg.adam_eps, fused=True)
        self.updates = 0

    def update(self, batch: ReplayBatch, head: int = 0) -> dict[str, float]:
        """One gradient step on a batch of one game, through its head."""
        return self.update_grouped(batch, [(head, slice(None))])

    def update_grouped(self, batch: ReplayBatch, groups: Sequence[tuple[int, slice]]) -> dict:
        """One gradient step on a batch grouped by game (`groups`: head index, rows): one trunk pass,
        each head on its own rows only, the loss `grouped_mean` of each group's td_loss, so that
        every game weighs the same whatever its rows. One group is exactly `update`."""
        cfg = self.cfg
        reward = batch.reward.clamp(-1.0, 1.0) if cfg.reward_clip else batch.reward
        with torch.no_grad():
            next_target = self._forward(self.target, batch.next_obs, groups)
            next_online = self._forward(self.net, batch.next_obs, groups) if cfg.double else [None] * len(groups)
            ys = [td_targets(reward[rows], batch.terminal[rows], t, o, cfg.gamma)
                  for (_, rows), t, o in zip(groups, next_target, next_online)]
        qs = self._forward(self.net, batch.obs, groups)
        losses = [td_loss(q, batch.action[rows], y, cfg.huber_delta) for (_, rows), q, y in zip(groups, qs, ys)]
        loss = grouped_mean(losses)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), cfg.max_grad_norm)
        self.optimizer.step()
        self.updates += 1
        if self.updates % cfg.target_update_every == 0:
            self.target.load_state_dict(self.net.state_dict())
        return {"loss": loss.item(), "q_mean": grouped_mean([q.detach().mean() for q in qs]).item(),
                "losses": [x.item() for x in losses] if len(losses) > 1 else [loss.item()]}

    def _forward(self, net: MultiHeadNet, obs: torch.Tensor, groups: Sequence[tuple[int, slice]]) -> list[torch.Tensor]:
        """Each group's outputs, computed in `precision` and returned in fp32 (targets and losses
        are fp32 whatever the forward passes ran in; for fp32, `.float()` returns the tensor itself)."""
        with autocast(obs.device, self.precision):
            return [q.float() for q in net(obs, groups=groups)]

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "target": self.target.state_dict(),
                "optimizer": self.optimizer.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.target.load_state_dict(state["target"])
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # a saved group's flags win on load: runs saved unfused run fused
            group.update(fused=True, foreach=None)
        self.updates = int(state["updates"])
