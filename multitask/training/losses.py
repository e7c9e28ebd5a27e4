"""Distillation losses (Rusu et al. 2016): pure functions of tensors.

Conventions, pinned down because public implementations disagree (papers.md):
- inputs are raw teacher outputs q_T (Q-values, as stored in the datasets) and raw student outputs z_S;
- the temperature tau applies to the teacher side only (tau < 1 sharpens Q-values into a peaked
  target), never to the student;
- every loss is summed over actions and averaged over the batch.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

LossName = Literal["kl", "nll", "mse"]
DEFAULT_TAU = 0.01  # Rusu et al. 2016: best of {1, 0.1, 0.01, 0.001}


def kl_loss(student_logits: torch.Tensor, teacher_q: torch.Tensor, tau: float = DEFAULT_TAU) -> torch.Tensor:
    """KL(softmax(q_T / tau) || softmax(z_S)), summed over actions, averaged over the batch.

    = mean_i sum_a p_T(a) [log p_T(a) - log softmax(z_S)(a)],  p_T = softmax(q_T / tau).
    Both sides are handled in log space (log_softmax), so a sharp target never produces log(0).
    """
    log_p_teacher = F.log_softmax(teacher_q / tau, dim=-1)
    log_p_student = F.log_softmax(student_logits, dim=-1)
    return (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=-1).mean()


def nll_loss(student_logits: torch.Tensor, teacher_q: torch.Tensor) -> torch.Tensor:
    """-log softmax(z_S)[argmax_a q_T(a)], averaged over the batch (no temperature)."""
    return F.cross_entropy(student_logits, teacher_q.argmax(dim=-1), reduction="mean")


def mse_loss(student_q: torch.Tensor, teacher_q: torch.Tensor) -> torch.Tensor:
    """||q_T - q_S||^2 summed over actions, averaged over the batch (the student outputs Q-values)."""
    return (student_q - teacher_q).pow(2).sum(dim=-1).mean()


def distillation_loss(name: LossName, student_out: torch.Tensor, teacher_q: torch.Tensor,
                      tau: float = DEFAULT_TAU) -> torch.Tensor:
    if name == "kl":
        return kl_loss(student_out, teacher_q, tau)
    if name == "nll":
        return nll_loss(student_out, teacher_q)
    if name == "mse":
        return mse_loss(student_out, teacher_q)
    raise ValueError(f"unknown loss {name}")


def normalised_loss(losses: list[torch.Tensor], means: list[float | None], rate: float,
                    values: list[float] | None = None) -> tuple[torch.Tensor, list[float]]:
    """Per-game loss normalisation for multi-task students: each game's loss divided by a running
    mean of its own values, so that games whose losses are larger (MinAtar: ~3x between Seaquest
    and Freeway late in training) do not dominate the shared trunk's gradients or RMSProp's scale.

    L = mean_g L_g / m_g (m_g held constant in the gradient), then m_g <- (1 - rate) m_g + rate L_g;
    a game's first value starts its mean (None: not seen yet). Returns L and the updated means.
    `values`: the L_g the means follow, if not the losses' own (under torchrun, their mean over
    processes, so that every process divides by the same means and a resume restores them all).
    """
    values = [float(l.detach()) for l in losses] if values is None else values
    divisors = [v if m is None else m for v, m in zip(values, means)]
    scaled = [l / max(d, 1e-12) for l, d in zip(losses, divisors)]
    return torch.stack(scaled).mean(), [v if m is None else (1.0 - rate) * m + rate * v for v, m in zip(values, means)]
