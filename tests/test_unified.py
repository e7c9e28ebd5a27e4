"""Paper B's unified update: the per-step losses, pseudo-rewards and returns against hand-computed
values, and the surrogate's gradient against the update written out by hand."""

import math

import pytest
import torch

from multitask.training import unified as u

LN = math.log


def _log(*p):
    return torch.log(torch.tensor(p, dtype=torch.float64))


def test_cross_entropies_and_their_direction():
    teacher, student = _log(0.25, 0.75), _log(0.5, 0.5)
    assert u.cross_entropy(teacher, student).item() == pytest.approx(LN(2))  # -(.25 ln .5 + .75 ln .5)
    assert u.step_loss("cross_entropy", teacher, student).item() == pytest.approx(LN(2))
    expected = -(0.5 * LN(0.25) + 0.5 * LN(0.75))  # H^x(student || teacher) = 0.83699
    assert u.step_loss("reverse_cross_entropy", teacher, student).item() == pytest.approx(expected)
    assert u.step_loss("none", teacher, student).item() == 0.0
    rows = torch.stack([teacher, student])
    assert u.cross_entropy(rows, rows).tolist() == pytest.approx([-(0.25 * LN(0.25) + 0.75 * LN(0.75)), LN(2)])


def test_teacher_log_probs_temperature_and_the_greedy_floor():
    q = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
    assert u.teacher_log_probs(q, 0.0).tolist() == pytest.approx([LN(0.5), LN(0.5), u.MIN_LOG_PROB])
    soft = u.teacher_log_probs(q, 0.5).exp()
    assert soft.tolist() == pytest.approx([math.e ** 2 / (2 * math.e ** 2 + 1)] * 2 + [1 / (2 * math.e ** 2 + 1)])


def test_pseudo_rewards_on_a_three_step_episode():
    # time-major, one trajectory; the episode ends after the last row (alive_next false there)
    teacher = torch.stack([_log(0.5, 0.5), _log(0.9, 0.1), _log(0.2, 0.8)])
    student = torch.stack([_log(0.6, 0.4), _log(0.3, 0.7), _log(0.5, 0.5)])
    actions = torch.tensor([0, 1, 1])
    alive_next = torch.tensor([True, True, False])
    pr = lambda kind, **kw: u.pseudo_reward(kind, teacher, student, actions, alive_next, **kw).tolist()
    assert pr("none") == [0.0, 0.0, 0.0]
    assert pr("teacher_log_prob") == pytest.approx([LN(0.5), LN(0.1), LN(0.8)])  # log pi(a_i | s_i)
    assert pr("next_teacher_log_prob") == pytest.approx([LN(0.1), LN(0.8), 0.0])  # log pi(a_{i+1} | s_{i+1})
    ce1 = -(0.9 * LN(0.3) + 0.1 * LN(0.7))
    ce2 = -(0.2 * LN(0.5) + 0.8 * LN(0.5))
    assert pr("next_cross_entropy") == pytest.approx([-ce1, -ce2, 0.0])  # -H^x(pi(s_{i+1}) || pi_theta(s_{i+1}))
    values = torch.tensor([1.0, 4.0, 6.0], dtype=torch.float64)
    rewards = torch.tensor([0.5, 0.0, 2.0], dtype=torch.float64)
    # r_i + gamma V(s_{i+1}) - V(s_i), V(end) = 0
    assert pr("teacher_value", teacher_value=values, rewards=rewards, gamma=0.5) == pytest.approx([1.5, -1.0, -4.0])
    with pytest.raises(ValueError, match="game rewards"):
        pr("teacher_value", teacher_value=values)


def test_teacher_v_reward_telescopes_to_the_return_minus_the_teachers_value():
    """Over an episode R_hat_t = G_t - V_pi(s_t) (potential-based shaping: the teacher's value adds
    no bias); over a window cut at its last row, the n-step return bootstrapped on V_pi(s_{T+1})."""
    gamma, steps = 0.9, 6
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randn(steps, generator=gen, dtype=torch.float64)
    values = torch.randn(steps, generator=gen, dtype=torch.float64)
    alive_next = torch.tensor([True, True, False, True, True, True])  # an episode ends at row 2, the window at 5
    boot = torch.tensor(3.0, dtype=torch.float64)
    no = torch.zeros(steps, 2, dtype=torch.float64)
    r_hat = u.pseudo_reward("teacher_value", no, no, torch.zeros(steps, dtype=torch.long), alive_next, values,
                            rewards, gamma, next_value=boot)
    returns = u.discounted_returns(r_hat, alive_next, gamma)
    g = [0.0] * steps
    for t in range(steps - 1, -1, -1):
        after = boot.item() if t == steps - 1 else (g[t + 1] if alive_next[t] else 0.0)
        g[t] = rewards[t].item() + gamma * after  # the plain (bootstrapped) discounted return
    assert returns.tolist() == pytest.approx([g[t] - values[t].item() for t in range(steps)])


def test_discounted_returns_stop_at_episode_ends():
    r = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    assert u.discounted_returns(r, torch.tensor([True, True, False]), 0.5).tolist() == [2.75, 3.5, 3.0]
    assert u.discounted_returns(r, torch.tensor([True, False, True]), 0.5).tolist() == [2.0, 2.0, 3.0]


def test_value_gate():
    # [V_pi - V_pi_theta]_+ (paper B, section 4): distil where the teacher is better, weighed by how much
    assert u.value_gate(torch.tensor([1.0, 2.0, 3.5]), torch.tensor([2.0, 2.0, 1.0])).tolist() == [0.0, 0.0, 2.5]


def test_mixture_control_score_function():
    """With the teacher's action taken at probability beta, the policy-gradient term weighs
    grad log q_theta(a) for q_theta = beta pi + (1 - beta) pi_theta: by hand,
    d/dlogits log q(a) = (1 - beta) pi_theta(a) (onehot(a) - pi_theta) / q(a)."""
    logits = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64, requires_grad=True)
    teacher = _log(0.6, 0.3, 0.1)
    beta, action = 0.25, 1
    student_log = torch.log_softmax(logits, -1)
    control = u.control_log_probs(student_log, teacher, beta)
    control[action].backward()
    pi = torch.softmax(logits.detach(), -1)
    q_a = beta * 0.3 + (1 - beta) * pi[action]
    assert control[action].item() == pytest.approx(math.log(q_a))
    onehot = torch.nn.functional.one_hot(torch.tensor(action), 3).to(torch.float64)
    assert torch.allclose(logits.grad, (1 - beta) * pi[action] * (onehot - pi) / q_a)
    assert u.control_log_probs(student_log, teacher, 0.0) is student_log  # beta 0: the student's own


def test_surrogate_gradient_is_the_unified_update_by_hand():
    logits = torch.tensor([[0.2, -0.1, 0.4], [0.0, 0.3, -0.2]], dtype=torch.float64, requires_grad=True)
    teacher = _log(0.7, 0.2, 0.1).expand(2, 3)
    actions = torch.tensor([2, 0])
    returns = torch.tensor([1.5, -0.5], dtype=torch.float64)
    baseline = torch.tensor([0.5, 0.5], dtype=torch.float64)
    student_log = torch.log_softmax(logits, -1)
    loss = u.surrogate_loss(student_log, actions, torch.tensor([True, True]), returns, baseline,
                            u.step_loss("cross_entropy", teacher, student_log))
    loss.backward()
    pi = torch.softmax(logits.detach(), -1)
    onehot = torch.nn.functional.one_hot(actions, 3).to(torch.float64)
    # d/dlogits of -log pi(a) * A  is  (pi - onehot(a)) * A;  of H^x(teacher || pi)  is  pi - teacher
    expected = (pi - onehot) * (returns - baseline).unsqueeze(-1) + (pi - teacher.exp())
    assert torch.allclose(logits.grad, expected)


def test_variants_and_their_names():
    assert set(u.VARIANTS) >= {"teacher_distill", "on_policy_distill", "entropy_regularised", "n_distill",
                               "expected_entropy_regularised", "teacher_v_reward", "value_gated_on_policy_distill"}
    v, plus = u.parse_variant("n_distill+R")
    assert plus and v == u.Variant("student", "cross_entropy", "next_cross_entropy")
    eer, plus = u.parse_variant("expected_entropy_regularised")
    assert not plus and (eer.step_loss, eer.pseudo_reward) == ("reverse_cross_entropy", "next_teacher_log_prob")
    with pytest.raises(ValueError, match="unknown distillation variant"):
        u.parse_variant("kickstarting")
    for name in ("teacher_distill+R", "uniform_distill+R"):  # REINFORCE needs the student's own actions
        with pytest.raises(ValueError, match="student's own trajectories"):
            u.parse_variant(name)
    with pytest.raises(ValueError, match="already includes the game reward"):
        u.parse_variant("teacher_v_reward+R")


VALID_NAMES = [v + plus for v in u.VARIANTS for plus in ("", "+R")
               if v not in ("teacher_distill", "uniform_distill", "teacher_v_reward") or not plus]


@pytest.mark.parametrize("name", VALID_NAMES)
def test_every_variant_keeps_its_tensors_on_the_inputs_device(name):
    """Each variant's whole update on `meta` tensors: a tensor made on the CPU inside it (the bug a
    GPU run would hit, and a CPU run cannot show) raises on the device mismatch."""
    variant, plus = u.parse_variant(name)
    steps, n, actions = 4, 3, 5
    meta = dict(device="meta", dtype=torch.float64)
    student_log = torch.log_softmax(torch.zeros(steps, n, actions, **meta, requires_grad=True), -1)
    gate = torch.ones(steps, n, **meta) if variant.value_gate else None
    loss, step, returns = u.variant_loss(
        variant, plus, torch.zeros(steps, n, actions, **meta), student_log,
        torch.zeros(steps, n, dtype=torch.long, device="meta"), torch.ones(steps, n, dtype=torch.bool, device="meta"),
        torch.ones(steps, n, dtype=torch.bool, device="meta"), torch.zeros(steps, n, **meta),
        torch.zeros(steps, n, **meta), torch.zeros(steps, n, **meta), 0.9, gate, teacher_share=0.3,
        next_value=torch.zeros(n, **meta))
    assert {t.device.type for t in (loss, step, returns)} == {"meta"} and loss.shape == ()
    loss.backward()


def _rows(steps=3, actions=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(steps, actions, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = torch.log_softmax(torch.randn(steps, actions, generator=gen, dtype=torch.float64), -1)
    return logits, teacher


def test_variant_loss_wires_the_gate_and_masks_rows_after_the_episode():
    logits, teacher = _rows()
    student_log = torch.log_softmax(logits, -1)
    on_policy = u.VARIANTS["value_gated_on_policy_distill"]
    zeros = torch.zeros(3, dtype=torch.float64)
    alive = torch.tensor([True, True, False])  # the episode ended after row 1; row 2 is padding
    gate = torch.tensor([2.0, 0.0, 1.0], dtype=torch.float64)
    _, step, _ = u.variant_loss(on_policy, False, teacher, student_log, torch.zeros(3, dtype=torch.long), alive,
                                torch.tensor([True, False, False]), zeros, zeros, zeros, 0.9, gate)
    assert step.tolist() == pytest.approx((gate * u.cross_entropy(teacher, student_log)).tolist())
    # +R on a padded row: its reward (10) must not enter any return
    _, _, returns = u.variant_loss(u.VARIANTS["on_policy_distill"], True, teacher, student_log,
                                   torch.zeros(3, dtype=torch.long), alive, torch.tensor([True, False, True]),
                                   torch.tensor([1.0, 2.0, 10.0], dtype=torch.float64), zeros, zeros, 0.5)
    assert returns.tolist() == pytest.approx([2.0, 2.0, 0.0])


def test_variant_loss_uses_the_mixture_score_function():
    """entropy regularised under a mixture at beta: the gradient is that of
    -log q_theta(a) (R_hat - b), q_theta = beta pi + (1 - beta) pi_theta, on each row; at beta = 1
    (teacher control) the policy-gradient term has no gradient at all."""
    logits, teacher = _rows(steps=2)
    actions, beta = torch.tensor([1, 2]), 0.25
    alive = torch.tensor([True, True])
    alive_next = torch.tensor([True, False])
    zeros = torch.zeros(2, dtype=torch.float64)
    baseline = torch.tensor([0.3, -0.2], dtype=torch.float64)
    variant = u.VARIANTS["entropy_regularised"]
    loss, _, returns = u.variant_loss(variant, False, teacher, torch.log_softmax(logits, -1), actions, alive,
                                      alive_next, zeros, zeros, baseline, 0.9, teacher_share=beta)
    loss.backward()
    pi = torch.softmax(logits.detach(), -1)
    mix = beta * teacher.exp() + (1 - beta) * pi
    expected = torch.zeros_like(pi)
    for t, a in enumerate(actions.tolist()):
        onehot = torch.nn.functional.one_hot(torch.tensor(a), 3).to(torch.float64)
        d_log_q = (1 - beta) * pi[t, a] * (onehot - pi[t]) / mix[t, a]
        expected[t] = -d_log_q * (returns[t] - baseline[t])
    assert torch.allclose(logits.grad, expected)
    logits.grad = None
    loss, _, _ = u.variant_loss(variant, False, teacher, torch.log_softmax(logits, -1), actions, alive,
                                alive_next, zeros, zeros, baseline, 0.9, teacher_share=1.0)
    assert not loss.requires_grad or torch.autograd.grad(loss, logits, allow_unused=True)[0] is None
