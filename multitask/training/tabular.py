"""Tabular students distilled by the unified update (training/unified.py) on batches of MDPs.

One student per MDP of the batch, a table of logits (observations x actions), all trained at once:
every update plays `episodes` episodes per MDP under the control policy (capped at `max_steps`),
computes the variant's per-step losses and pseudo-rewards, and takes one step on the surrogate loss
averaged over those episodes. The
baseline b(s) is a per-observation running mean of the pseudo-returns (rate `baseline_rate`).
Every `eval_every` updates the student's exact return from the start state is computed
(envs/gridworld.policy_values), so learning curves carry no evaluation noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import torch

from multitask.config import option
from multitask.envs.gridworld import TabularMDPs, policy_values, visits
from multitask.training import unified as u


@dataclass(frozen=True)
class TabularConfig:
    variant: str = option("on_policy_distill", "unified-update variant (training/unified.VARIANTS), '+R' adds the reward")
    updates: int = option(400, "updates, `episodes` episodes per MDP each (paper B: ~30,000 steps; here the default grids' "
                                "curves are flat by 300, docs/gridworld.md)")
    optimizer: Literal["adam", "sgd"] = option("adam", "optimiser of the logits (paper B: unknown)")
    lr: float = option(0.05, "step size on the logits (paper B: unknown)")
    gamma: float = option(0.9, "discount of the pseudo-returns (paper B: 0.99; 0.9 measured far better for every "
                               "policy-gradient variant here: expected entropy regularised 9.30 vs 6.33, teacher 9.17, "
                               "8 grids, 400 updates, docs/gridworld.md)")
    baseline_rate: float = option(0.1, "rate of the per-observation running-mean baseline of the pseudo-returns")
    max_steps: int = option(300, "episode cap in steps (with end_prob 0.01, 5% of episodes reach 300)")
    eval_every: int = option(10, "updates between exact evaluations of the students' returns")
    episodes: int = option(1, "episodes per MDP per update, averaged (K episodes: K times less gradient variance)")

    def __post_init__(self):
        u.parse_variant(self.variant)  # unknown or ill-posed variants raise here
        if min(self.updates, self.max_steps, self.eval_every, self.episodes) < 1 or self.lr <= 0:
            raise ValueError("updates, max_steps, eval_every, episodes and lr must be positive")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError("gamma must be in [0, 1]")


@dataclass
class Teacher:
    """A teacher for every MDP of a batch: log-probabilities (B, S, A) and its values (B, S)."""
    log_probs: torch.Tensor
    values: torch.Tensor

    def repeat(self, k: int) -> Teacher:
        """The teacher of TabularMDPs.repeat(k): row j * B + b is MDP b's."""
        return Teacher(self.log_probs.repeat(k, 1, 1), self.values.repeat(k, 1))


def make_teacher(mdps: TabularMDPs, q: torch.Tensor, tau: float) -> Teacher:
    log_probs = u.teacher_log_probs(q, tau)
    return Teacher(log_probs, policy_values(mdps, log_probs.exp()))


@dataclass
class Curve:
    """At each evaluation: the update (E,), each MDP's exact return from the start state (E, B)
    and the teacher-labelled steps its student had trained on so far (E, B)."""
    updates: list[int]
    returns: np.ndarray
    labels: np.ndarray


def student_policy(logits: torch.Tensor, mdps: TabularMDPs) -> torch.Tensor:
    """The students' policies over states (B, S, A), aliased states sharing their row."""
    return torch.softmax(logits, -1)[:, mdps.observation]


def rollout(mdps: TabularMDPs, control: str, logits: torch.Tensor, teacher: Teacher, max_steps: int,
            gen: torch.Generator) -> dict[str, torch.Tensor]:
    """One episode per MDP under `control`, time-major (T, B): states, actions, rewards, alive (the
    row is a real step) and alive_next (the episode goes on after it)."""
    b = mdps.batch
    idx = torch.arange(b)
    state = torch.full((b,), mdps.start, dtype=torch.long)
    alive = torch.ones(b, dtype=torch.bool)
    rows = {k: [] for k in ("states", "actions", "rewards", "alive", "alive_next")}
    with torch.no_grad():
        student = torch.softmax(logits, -1)
        for _ in range(max_steps):
            if control == "teacher":
                probs = teacher.log_probs[idx, state].exp()
            elif control == "student":
                probs = student[idx, mdps.observation[state]]
            else:
                probs = torch.ones(b, mdps.num_actions, dtype=torch.float64)
            action = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
            move = mdps.move_of(action)
            noisy = torch.rand(b, generator=gen, dtype=torch.float64) < mdps.noise
            move = torch.where(noisy, torch.randint(mdps.num_moves, (b,), generator=gen), move)
            nxt = mdps.next_state[idx, state, move]
            ended = mdps.terminal[idx, nxt] | (torch.rand(b, generator=gen, dtype=torch.float64) < mdps.end_prob)
            for k, v in (("states", state), ("actions", action), ("rewards", mdps.reward[idx, nxt] * alive),
                         ("alive", alive), ("alive_next", alive & ~ended)):
                rows[k].append(v)
            alive = alive & ~ended
            state = nxt
            if not alive.any():
                break
    return {k: torch.stack(v) for k, v in rows.items()}


def update_baseline(table: torch.Tensor, b_idx: torch.Tensor, obs: torch.Tensor, returns: torch.Tensor,
                    mask: torch.Tensor, rate: float) -> None:
    """b(o) <- b(o) + rate * mean over the visits of o (R_hat - b(o)), in place; (B, O) table,
    time-major (T, N) visits of the students `b_idx`."""
    err = ((returns - table[b_idx, obs]) * mask).to(table.dtype)
    total = torch.zeros_like(table).index_put_((b_idx, obs), err, accumulate=True)
    count = torch.zeros_like(table).index_put_((b_idx, obs), mask.to(table.dtype), accumulate=True)
    table += rate * total / count.clamp_min(1)


def surrogate(mdps: TabularMDPs, teacher: Teacher, variant_name: str, logits: torch.Tensor,
              ep: dict[str, torch.Tensor], b_idx: torch.Tensor, baseline: torch.Tensor, gamma: float,
              student_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The unified update's surrogate loss on played episodes `ep` (time-major rows of the students
    `b_idx`), and the pseudo-returns R_hat it used: per-step loss (value-gated if the variant is)
    plus the policy-gradient term on the discounted pseudo-rewards (+R: plus the rewards) against
    `baseline` at each row."""
    variant, plus_reward = u.parse_variant(variant_name)
    obs = mdps.observation[ep["states"]]
    student_log = torch.log_softmax(logits[b_idx, obs], -1)
    teacher_log = teacher.log_probs[b_idx, ep["states"]]
    values = teacher.values[b_idx, ep["states"]]
    gate = u.value_gate(values, student_values[b_idx, ep["states"]]) if variant.value_gate else None
    loss, _, returns = u.variant_loss(variant, plus_reward, teacher_log, student_log, ep["actions"], ep["alive"],
                                      ep["alive_next"], ep["rewards"], values, baseline, gamma, gate)
    return loss, returns


def train(mdps: TabularMDPs, teacher: Teacher, cfg: TabularConfig, seed: int,
          tick: Callable[[int], None] = lambda n: None) -> tuple[torch.Tensor, Curve]:
    """Distil one tabular student per MDP with cfg.variant; returns the final logits (B, O, A) and
    the exact-return curve (evaluated at update 0, every eval_every and at the end). `tick(1)` after
    each update (a progress bar's)."""
    variant, _ = u.parse_variant(cfg.variant)
    gen = torch.Generator().manual_seed(seed)
    logits = torch.zeros(mdps.batch, mdps.num_observations, mdps.num_actions, dtype=torch.float64, requires_grad=True)
    baseline = torch.zeros(mdps.batch, mdps.num_observations, dtype=torch.float64)
    curve_updates, curve_returns, curve_labels = [], [], []
    labels = torch.zeros(mdps.batch, dtype=torch.long)
    opt = (torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.SGD)([logits], lr=cfg.lr)
    played = mdps.repeat(cfg.episodes)  # row k * B + b plays MDP b for its student b
    played_teacher = teacher.repeat(cfg.episodes)

    def evaluate(step: int) -> torch.Tensor:
        values = policy_values(mdps, student_policy(logits.detach(), mdps))
        curve_updates.append(step)
        curve_returns.append(values[:, mdps.start].numpy().copy())
        curve_labels.append(labels.numpy().copy())
        return values

    student_values = evaluate(0)
    for step in range(1, cfg.updates + 1):
        ep = rollout(played, variant.control, logits.detach().repeat(cfg.episodes, 1, 1), played_teacher,
                     cfg.max_steps, gen)
        labels += ep["alive"].sum(0).view(cfg.episodes, mdps.batch).sum(0)
        b_idx = (torch.arange(played.batch) % mdps.batch).expand_as(ep["states"])  # the student of each row
        obs = mdps.observation[ep["states"]]
        loss, returns = surrogate(mdps, teacher, cfg.variant, logits, ep, b_idx, baseline[b_idx, obs], cfg.gamma,
                                  student_values)
        opt.zero_grad()
        (loss * mdps.batch).backward()  # each MDP's student takes its own full step
        opt.step()
        update_baseline(baseline, b_idx, obs, returns, ep["alive"], cfg.baseline_rate)
        tick(1)
        if step % cfg.eval_every == 0 or step == cfg.updates:
            values = evaluate(step)
            if variant.value_gate:  # V_pi_theta for the gate, exact as of the last evaluation
                student_values = values
    return logits.detach(), Curve(curve_updates, np.stack(curve_returns), np.stack(curve_labels))


EXPECTED_VARIANTS = ("on_policy_distill", "n_distill")  # the variants whose expected update has a closed form here


def expected_loss(mdps: TabularMDPs, logits: torch.Tensor, teacher: Teacher, variant: str) -> torch.Tensor:
    """A loss whose gradient is the variant's expected update with gamma = 1, summed over MDPs:
    sum_s v(s) H^x(pi(s) || pi_theta(s)) (- V_pi_theta(start) with +R), v the expected visits. For
    on-policy distill v carries no gradient (the update ignores how the student moves its visits);
    for n-distill it does: its pseudo-reward is that missing term, so n-distill is the exact gradient."""
    _, plus_reward = u.parse_variant(variant)
    name = variant.removesuffix("+R")
    if name not in EXPECTED_VARIANTS:
        raise ValueError(f"{variant}: expected updates exist for {', '.join(EXPECTED_VARIANTS)} (+R) only")
    policy = student_policy(logits, mdps)
    v = visits(mdps, policy)
    ce = u.cross_entropy(teacher.log_probs, torch.log_softmax(logits, -1)[:, mdps.observation])
    loss = ((v if name == "n_distill" else v.detach()) * ce).sum()
    if plus_reward:
        loss = loss - policy_values(mdps, policy)[:, mdps.start].sum()
    return loss


def train_expected(mdps: TabularMDPs, teacher: Teacher, cfg: TabularConfig, seed: int,
                   init_scale: float = 0.1, tick: Callable[[int], None] = lambda n: None) -> tuple[torch.Tensor, Curve]:
    """Plain gradient steps of cfg.lr on `expected_loss` (no sampling: the update's own dynamics),
    from logits drawn N(0, init_scale^2) (zero logits can sit on a symmetric fixed point); the curve
    as `train`'s, labels 0; `tick(1)` after each step."""
    gen = torch.Generator().manual_seed(seed)
    logits = (init_scale * torch.randn(mdps.batch, mdps.num_observations, mdps.num_actions, generator=gen,
                                       dtype=torch.float64)).requires_grad_()
    steps, returns = [], []
    for step in range(cfg.updates + 1):
        if step % cfg.eval_every == 0 or step == cfg.updates:
            with torch.no_grad():
                returns.append(policy_values(mdps, student_policy(logits, mdps))[:, mdps.start].numpy().copy())
            steps.append(step)
        if step == cfg.updates:
            break
        grad, = torch.autograd.grad(expected_loss(mdps, logits, teacher, cfg.variant), logits)
        with torch.no_grad():
            logits -= cfg.lr * grad
        tick(1)
    stacked = np.stack(returns)
    return logits.detach(), Curve(steps, stacked, np.zeros_like(stacked, dtype=np.int64))
