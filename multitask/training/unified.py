"""The unified distillation update of "Distilling Policy Distillation" (Czarnecki et al. 2019, eq. 1).

Every variant is one update with three choices: the control policy q that plays the trajectories,
a per-step loss l, and a pseudo-reward r_hat optimised by policy gradient:

    grad = E_{tau ~ q} [ sum_t  -grad log pi_theta(a_t | s_t) * (R_hat_t - b(s_t))  +  grad l(pi_theta, s_t) ]
    R_hat_t = sum_{i >= t} gamma^(i - t) r_hat_i          (within the episode)

`surrogate_loss` is a scalar whose autograd gradient is that update (the returns and the baseline
are constants to it). The per-step losses and pseudo-rewards are small pure functions on log-
probabilities (torch tensors, actions on the last axis), shared by the tabular grid-world students
and by network students. Notation: pi is the teacher's policy (softmax(q / tau) for a Q-value
teacher), pi_theta the student's, H^x(p || q) = -sum_a p(a) log q(a) the cross-entropy.

Variants (paper B, Table 1; VARIANTS below): control, per-step loss, pseudo-reward and gate.
"+R" adds the environment reward r_i to every pseudo-reward (needed to surpass the teacher); the
teacher V reward has r_i in its own pseudo-reward. Under a teacher-student mixture control the
score function is the mixture's own, grad log q_theta(a_t | s_t) (`control_log_probs`), so the
policy-gradient term stays the gradient of the expected pseudo-return of the trajectories played.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

Control = Literal["teacher", "student", "uniform"]
StepLoss = Literal["none", "cross_entropy", "reverse_cross_entropy"]
PseudoReward = Literal["none", "teacher_log_prob", "next_cross_entropy", "next_teacher_log_prob", "teacher_value"]

# A teacher with temperature 0 gives its non-greedy actions probability 0, so log pi = -inf there;
# rewards built from log pi are floored at log(1e-6) (about -13.8) to stay finite. The floor only
# matters for such teachers and for actions a soft teacher all but rules out.
MIN_LOG_PROB = -13.815510557964274  # log(1e-6)


@dataclass(frozen=True)
class Variant:
    """One row of paper B's Table 1 (plus the value gate)."""
    control: Control
    step_loss: StepLoss
    pseudo_reward: PseudoReward
    value_gate: bool = False  # multiply the per-step loss by [V_pi(s) - V_pi_theta(s)]_+


VARIANTS: dict[str, Variant] = {
    "teacher_distill": Variant("teacher", "cross_entropy", "none"),
    "on_policy_distill": Variant("student", "cross_entropy", "none"),
    "uniform_distill": Variant("uniform", "cross_entropy", "none"),  # paper B's third control policy
    "entropy_regularised": Variant("student", "none", "teacher_log_prob"),
    "n_distill": Variant("student", "cross_entropy", "next_cross_entropy"),
    "expected_entropy_regularised": Variant("student", "reverse_cross_entropy", "next_teacher_log_prob"),
    "teacher_v_reward": Variant("student", "none", "teacher_value"),
    "value_gated_on_policy_distill": Variant("student", "cross_entropy", "none", value_gate=True),
}


def parse_variant(name: str) -> tuple[Variant, bool]:
    """`<variant>` or `<variant>+R` -> (Variant, plus_reward). Unknown names raise ValueError, and so
    do policy-gradient terms on trajectories the student does not play (teacher or uniform control)
    and `teacher_v_reward+R` (its pseudo-reward already holds r_i)."""
    base, plus = (name[:-2], True) if name.endswith("+R") else (name, False)
    if base not in VARIANTS:
        raise ValueError(f"unknown distillation variant {name!r}; known: {', '.join(VARIANTS)} (each also with +R)")
    variant = VARIANTS[base]
    if variant.control != "student" and (variant.pseudo_reward != "none" or plus):
        raise ValueError(f"{name}: policy-gradient terms need the student's own trajectories")
    if plus and variant.pseudo_reward == "teacher_value":
        raise ValueError(f"{name}: the teacher V reward already includes the game reward; drop '+R'")
    return variant, plus


def teacher_log_probs(q_values: torch.Tensor, tau: float) -> torch.Tensor:
    """log softmax(q / tau) over the last axis; tau = 0 is the greedy policy (ties share the
    probability), its zero-probability actions at MIN_LOG_PROB."""
    if tau > 0:
        return torch.log_softmax(q_values / tau, dim=-1)
    best = q_values == q_values.max(dim=-1, keepdim=True).values
    probs = best.to(q_values.dtype) / best.sum(dim=-1, keepdim=True)
    return torch.log(probs).clamp_min(MIN_LOG_PROB)


def policy_value(log_probs: torch.Tensor, q_values: torch.Tensor) -> torch.Tensor:
    """V_pi(s) = sum_a pi(a | s) q(s, a) per row (the teacher's value under its softmax policy)."""
    return (log_probs.exp() * q_values).sum(dim=-1)


def cross_entropy(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """H^x(p || q) = -sum_a p(a) log q(a), per row (sum over the last axis, no reduction over rows).
    Both arguments are log-probabilities; gradients flow into both."""
    return -(p_log.exp() * q_log).sum(dim=-1)


def step_loss(kind: StepLoss, teacher_log: torch.Tensor, student_log: torch.Tensor) -> torch.Tensor:
    """The per-step loss l at every row: `cross_entropy` H^x(pi || pi_theta) (teacher, on-policy and
    n-distill), `reverse_cross_entropy` H^x(pi_theta || pi) (expected entropy regularised; the
    teacher's log-probabilities floored at MIN_LOG_PROB), `none` 0."""
    if kind == "cross_entropy":
        return cross_entropy(teacher_log, student_log)
    if kind == "reverse_cross_entropy":
        return cross_entropy(student_log, teacher_log.clamp_min(MIN_LOG_PROB))
    return torch.zeros(student_log.shape[:-1], dtype=student_log.dtype, device=student_log.device)


def pseudo_reward(kind: PseudoReward, teacher_log: torch.Tensor, student_log: torch.Tensor, actions: torch.Tensor,
                  alive_next: torch.Tensor, teacher_value: torch.Tensor | None = None,
                  rewards: torch.Tensor | None = None, gamma: float = 1.0,
                  next_value: torch.Tensor | None = None) -> torch.Tensor:
    """r_hat_i at every step of time-major rows (T, ...), with no gradient.

    - teacher_log_prob (entropy regularised): log pi(a_i | s_i);
    - next_cross_entropy (n-distill): -H^x(pi(s_{i+1}) || pi_theta(s_{i+1}));
    - next_teacher_log_prob (expected entropy regularised): log pi(a_{i+1} | s_{i+1});
    - teacher_value (teacher V reward): r_i + gamma V_pi(s_{i+1}) - V_pi(s_i), the game reward
      shaped by the teacher's value as potential (paper B, section 4 and its Proposition 4; Ng et al.
      1999). The gamma is the pseudo-returns' own: with it the sum telescopes, R_hat_t = (the
      discounted game return from t) - V_pi(s_t) over a whole episode, and over a window cut at row
      T it is the n-step return bootstrapped on gamma^(T+1-t) V_pi(s_{T+1}) (`next_value`, V_pi of
      the state after the last row; 0 when not given). Without r_i the sum is -V_pi(s_t) whatever
      the actions, a zero expected gradient;
    - none: 0.
    Terms of s_{i+1} are 0 where the episode ended at step i (`alive_next` false); teacher_value
    takes V_pi at every row, with V_pi(end) = 0.
    """
    with torch.no_grad():
        t_log = teacher_log.clamp_min(MIN_LOG_PROB)
        if kind == "none":
            return torch.zeros(actions.shape, dtype=student_log.dtype, device=student_log.device)
        if kind == "teacher_log_prob":
            return t_log.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
        if kind == "teacher_value":
            if teacher_value is None or rewards is None:
                raise ValueError("the teacher V reward needs the teacher's state values and the game rewards")
            following = _next(teacher_value, alive_next)
            if next_value is not None:
                following[-1] = next_value * alive_next[-1].to(following.dtype)
            return rewards + gamma * following - teacher_value
        if kind == "next_cross_entropy":
            per_step = -cross_entropy(teacher_log, student_log)
        elif kind == "next_teacher_log_prob":
            per_step = t_log.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
        else:
            raise ValueError(f"unknown pseudo-reward {kind!r}")
        return _next(per_step, alive_next)


def _next(per_step: torch.Tensor, alive_next: torch.Tensor) -> torch.Tensor:
    """x_{i+1} at row i (time-major), 0 where the episode ended at i or at the last row."""
    shifted = torch.zeros_like(per_step)
    shifted[:-1] = per_step[1:]
    return shifted * alive_next.to(per_step.dtype)


def discounted_returns(rewards: torch.Tensor, alive_next: torch.Tensor, gamma: float) -> torch.Tensor:
    """R_t = r_t + gamma * alive_next_t * R_{t+1} over time-major rows (T, ...): sums stop where
    an episode ended (alive_next false) and at the last row."""
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[0])
    for t in range(rewards.shape[0] - 1, -1, -1):
        running = rewards[t] + gamma * alive_next[t].to(rewards.dtype) * running
        out[t] = running
    return out


def value_gate(teacher_value: torch.Tensor, student_value: torch.Tensor) -> torch.Tensor:
    """[V_pi(s) - V_pi_theta(s)]_+, the per-step loss's weight: distil only where the teacher is
    better, and the more the better it is (paper B, section 4). No gradient."""
    return (teacher_value - student_value).clamp_min(0.0).detach()


def control_log_probs(student_log: torch.Tensor, teacher_log: torch.Tensor, teacher_share: float) -> torch.Tensor:
    """log q_theta(a | s) of the mixture control that takes the teacher's sampled action with
    probability beta = `teacher_share` and the student's otherwise:
    log(beta pi(a | s) + (1 - beta) pi_theta(a | s)); the student's own log-probabilities at beta = 0.
    Gradients flow through the student's part only."""
    if teacher_share <= 0.0:
        return student_log
    if teacher_share >= 1.0:
        return teacher_log.detach()
    return torch.logaddexp(teacher_log.detach() + math.log(teacher_share), student_log + math.log1p(-teacher_share))


def surrogate_loss(control_log: torch.Tensor, actions: torch.Tensor, mask: torch.Tensor, returns: torch.Tensor,
                   baseline: torch.Tensor, per_step_loss: torch.Tensor) -> torch.Tensor:
    """sum_t mask_t [ -log q_theta(a_t | s_t) (R_hat_t - b_t) + l_t ], summed over time and
    averaged over the other axes (independent trajectories); `control_log` holds log q_theta, the
    control policy's log-probabilities (the student's, or a mixture's: `control_log_probs`). Returns
    and baseline carry no gradient."""
    log_pa = control_log.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    advantage = (returns - baseline).detach()
    per_step = -log_pa * advantage + per_step_loss
    return (per_step * mask.to(per_step.dtype)).sum(dim=0).mean()


def variant_loss(variant: Variant, plus_reward: bool, teacher_log: torch.Tensor, student_log: torch.Tensor,
                 actions: torch.Tensor, alive: torch.Tensor, alive_next: torch.Tensor, rewards: torch.Tensor,
                 teacher_value: torch.Tensor, baseline: torch.Tensor, gamma: float,
                 gate: torch.Tensor | None = None, teacher_share: float = 0.0,
                 next_value: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One variant's update on time-major rows (T, ...): (surrogate loss, per-step loss l, R_hat).

    l = `step_loss` (times `gate`, the value gate's [V_pi - V_pi_theta]_+, where given); r_hat =
    `pseudo_reward` (+ r_i with "+R"; `next_value` bootstraps the teacher V reward at the last row);
    R_hat = `discounted_returns` of r_hat on the rows where the episode is `alive`; loss =
    `surrogate_loss` masked by `alive`, its score function that of the control played (the mixture
    with the teacher at `teacher_share`, `control_log_probs`). Every tensor stays on the inputs' device."""
    loss_t = step_loss(variant.step_loss, teacher_log, student_log)
    if gate is not None:
        loss_t = loss_t * gate
    r_hat = pseudo_reward(variant.pseudo_reward, teacher_log, student_log, actions, alive_next, teacher_value,
                          rewards, gamma, next_value)
    if plus_reward:
        r_hat = r_hat + rewards
    returns = discounted_returns(r_hat * alive, alive_next, gamma)
    control_log = control_log_probs(student_log, teacher_log, teacher_share)
    return surrogate_loss(control_log, actions, alive, returns, baseline, loss_t), loss_t, returns
