"""Distillation losses against hand-computed values; reduction and input domain pinned down."""

import math

import pytest
import torch

from multitask.training.losses import distillation_loss, kl_loss, mse_loss, nll_loss


def test_kl_by_hand_with_teacher_side_temperature():
    q_t = torch.tensor([[1.0, 2.0]])
    z_s = torch.tensor([[0.0, 0.0]])
    # tau = 1: p_T = softmax([1, 2]) = [1/(1+e), e/(1+e)], p_S = [0.5, 0.5]
    p1, p2 = 1 / (1 + math.e), math.e / (1 + math.e)
    expected = p1 * math.log(p1 / 0.5) + p2 * math.log(p2 / 0.5)
    assert kl_loss(z_s, q_t, tau=1.0).item() == pytest.approx(expected, rel=1e-6)
    # tau = 0.5 sharpens the teacher only: p_T = softmax([2, 4]); the student is not rescaled
    r1, r2 = 1 / (1 + math.e ** 2), math.e ** 2 / (1 + math.e ** 2)
    expected_sharp = r1 * math.log(r1 / 0.5) + r2 * math.log(r2 / 0.5)
    assert kl_loss(z_s, q_t, tau=0.5).item() == pytest.approx(expected_sharp, rel=1e-6)


def test_kl_sums_over_actions_and_averages_over_batch():
    q_t = torch.tensor([[1.0, 2.0, 0.5], [0.0, 0.0, 3.0]])
    z_s = torch.tensor([[0.3, -0.2, 0.1], [1.0, 0.0, -1.0]])
    per_row = [kl_loss(z_s[i:i + 1], q_t[i:i + 1], tau=0.7).item() for i in range(2)]
    assert kl_loss(z_s, q_t, tau=0.7).item() == pytest.approx(sum(per_row) / 2, rel=1e-6)
    # a 32-row batch of copies gives the same value (mean, not sum, over the batch)
    assert kl_loss(z_s.repeat(16, 1), q_t.repeat(16, 1), tau=0.7).item() == pytest.approx(sum(per_row) / 2, rel=1e-5)


def test_kl_is_zero_at_the_sharpened_target_and_finite_when_sharp():
    q_t = torch.tensor([[1.0, 2.0, 0.5]])
    tau = 0.1
    assert kl_loss(q_t / tau, q_t, tau).item() == pytest.approx(0.0, abs=1e-6)
    # tau = 0.01 on Q-value gaps of ~1 gives p_T ~ one-hot: still finite (log space)
    big = kl_loss(torch.tensor([[5.0, -5.0, 0.0]]), q_t, 0.01)
    assert torch.isfinite(big) and big.item() > 5


def test_kl_takes_raw_outputs_not_probabilities():
    """Both sides are raw outputs (logits, Q-values): the student's go through a softmax inside, so
    a constant added to them changes nothing, and the value is the KL of the two softmaxes by hand;
    probabilities passed instead give another (wrong) value."""
    q_t = torch.tensor([[1.0, 3.0]])
    z_s = torch.tensor([[2.0, 0.0]])
    p_t = [1 / (1 + math.e ** 2), math.e ** 2 / (1 + math.e ** 2)]
    p_s = [math.e ** 2 / (1 + math.e ** 2), 1 / (1 + math.e ** 2)]
    expected = sum(t * math.log(t / s) for t, s in zip(p_t, p_s))
    raw = kl_loss(z_s, q_t, tau=1.0).item()
    assert raw == pytest.approx(expected, rel=1e-6)
    assert kl_loss(z_s + 7.0, q_t + 3.0, tau=1.0).item() == pytest.approx(expected, rel=1e-5)
    probs = kl_loss(torch.softmax(z_s, -1), torch.softmax(q_t, -1), tau=1.0).item()
    assert raw != pytest.approx(probs, rel=1e-3)


def test_nll_by_hand():
    q_t = torch.tensor([[0.1, 0.9, 0.3], [2.0, 1.0, 0.0]])  # greedy actions 1 and 0
    z_s = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    e = math.e
    expected = (-math.log(1 / 3) - math.log(e / (e + 2))) / 2
    assert nll_loss(z_s, q_t).item() == pytest.approx(expected, rel=1e-6)


def test_mse_by_hand():
    q_t = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    q_s = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    # row sums of squares: 1 + 4 = 5 and 1 + 1 = 2; batch mean 3.5
    assert mse_loss(q_s, q_t).item() == pytest.approx(3.5)


def test_dispatch():
    q = torch.randn(4, 3)
    z = torch.randn(4, 3)
    assert distillation_loss("kl", z, q, 0.5) == kl_loss(z, q, 0.5)
    assert distillation_loss("nll", z, q) == nll_loss(z, q)
    assert distillation_loss("mse", z, q) == mse_loss(z, q)
    with pytest.raises(ValueError):
        distillation_loss("l1", z, q)


def test_normalised_loss_divides_each_game_by_its_running_mean_held_constant():
    from multitask.training.losses import normalised_loss

    a, b = torch.tensor(2.0, requires_grad=True), torch.tensor(0.5, requires_grad=True)
    loss, means = normalised_loss([a, b], [None, 0.25], rate=0.1)
    # a's first value starts its mean (2/2 = 1); b is divided by its mean 0.25 (0.5/0.25 = 2)
    assert loss.item() == pytest.approx((1.0 + 2.0) / 2)
    assert means == pytest.approx([2.0, 0.9 * 0.25 + 0.1 * 0.5])
    loss.backward()  # the means are constants: d/da (a / 2) / 2, d/db (b / 0.25) / 2
    assert a.grad.item() == pytest.approx(0.25) and b.grad.item() == pytest.approx(2.0)
