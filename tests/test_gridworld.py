"""Paper B's grid worlds: sampled MDPs, exact values on a hand-solvable MDP, value-iteration
teachers, tabular students, and each study's finding at a micro size (seeded)."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from multitask.envs.gridworld import GridConfig, TabularMDPs, cyclic_fork, optimal_q, policy_values, sample_grids
from multitask.training.gridworld_studies import StudyConfig, run_study
from multitask.training.tabular import (TabularConfig, expected_loss, make_teacher, rollout, surrogate,
                                         train)


def _fork() -> TabularMDPs:
    """Start 0 -> left 1 or right 2 (2 actions); from 1: -1 or -2, from 2: 0 or -3 (terminals 3..6)."""
    nxt = torch.tensor([[[1, 2], [3, 4], [5, 6], [3, 3], [4, 4], [5, 5], [6, 6]]])
    reward = torch.tensor([[0.0, 0.0, 0.0, -1.0, -2.0, 0.0, -3.0]], dtype=torch.float64)
    terminal = torch.tensor([[False, False, False, True, True, True, True]])
    return TabularMDPs(nxt, reward, terminal, 0, 0.0, 0.0, 2, torch.arange(7))


def test_exact_values_and_optimal_q_on_a_hand_solvable_mdp():
    mdp = _fork()
    uniform = torch.full((1, 7, 2), 0.5, dtype=torch.float64)
    v = policy_values(mdp, uniform)[0]
    assert v[:3].tolist() == pytest.approx([-1.5, -1.5, -1.5])
    q = optimal_q(mdp)[0]
    assert q[:3].flatten().tolist() == pytest.approx([-1.0, 0.0, -1.0, -2.0, 0.0, -3.0])
    noisy = TabularMDPs(mdp.next_state, mdp.reward, mdp.terminal, 0, 0.5, 0.1, 2, mdp.observation)
    # noise 0.5 over 2 moves: the intended move 75%, the other 25%; a step into a non-terminal state
    # continues with probability 1 - end_prob = 0.9. By hand: Q(2) = (-0.75, -2.25), Q(1) = (-1.25, -1.75),
    # entering 1 is worth 0.9 * -1.25, entering 2 0.9 * -0.75, so Q(0) = (-1.0125, -0.7875).
    expected = [-1.0125, -0.7875, -1.25, -1.75, -0.75, -2.25]
    assert optimal_q(noisy)[0, :3].flatten().tolist() == pytest.approx(expected)
    greedy = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]] + [[1.0, 0.0]] * 4], dtype=torch.float64)
    assert policy_values(noisy, greedy)[0, :3].tolist() == pytest.approx([-0.7875, -1.25, -0.75])


def test_sampled_grids_follow_the_config():
    cfg = GridConfig()
    mdps = sample_grids(cfg, 64, seed=3)
    assert mdps.next_state.shape == (64, 400, 4) and mdps.start == 210
    walls = mdps.walls
    assert not walls[:, mdps.start].any() and not mdps.terminal[:, mdps.start].any()
    assert abs(walls.float().mean().item() - cfg.wall_prob) < 0.02
    assert abs(mdps.terminal.float().mean().item() - cfg.goal_prob - cfg.pit_prob) < 0.01
    entered = mdps.next_state.reshape(64, -1)
    assert not torch.gather(walls, 1, entered)[~walls.repeat_interleave(4, 1)].any()  # moves never enter a wall
    again = sample_grids(cfg, 64, seed=3)
    assert torch.equal(again.next_state, mdps.next_state) and torch.equal(again.reward, mdps.reward)
    q = optimal_q(mdps)
    greedy = torch.nn.functional.one_hot(q.argmax(-1), 4).to(torch.float64)
    v = policy_values(mdps, greedy)
    assert torch.allclose(v, q.max(-1).values, atol=1e-6)  # the greedy policy's value is V*


def test_students_learn_the_teacher_on_grids():
    mdps = sample_grids(GridConfig(), 4, seed=0)
    teacher = make_teacher(mdps, optimal_q(mdps), 0.01)
    cfg = TabularConfig(variant="on_policy_distill", updates=60, eval_every=20)
    logits, curve = train(mdps, teacher, cfg, seed=0)
    assert curve.updates == [0, 20, 40, 60] and curve.returns.shape == curve.labels.shape == (4, 4)
    assert (curve.labels[0] == 0).all() and (np.diff(curve.labels, axis=0) >= 20).all()  # >= 1 step per episode
    t_ret = teacher.values[:, mdps.start].numpy()
    assert (curve.returns[-1] > curve.returns[0]).all() and (curve.returns[-1] > 0.8 * t_ret).all()
    _, again = train(mdps, teacher, cfg, seed=0)
    assert np.array_equal(again.returns, curve.returns)  # seeded
    for variant in ("n_distill+R", "expected_entropy_regularised+R", "teacher_v_reward", "value_gated_on_policy_distill"):
        _, c = train(mdps, teacher, TabularConfig(variant=variant, updates=20, eval_every=20), seed=0)
        assert np.isfinite(c.returns).all()
    with pytest.raises(ValueError, match="student's own trajectories"):
        TabularConfig(variant="teacher_distill+R")


def test_teacher_v_reward_learns_the_game_on_grids():
    """The teacher V reward is the game reward shaped by the teacher's value: it learns from the
    uniform start (without r_i, or without the shaping's gamma, its pseudo-return carries next to no
    signal: measured 4 grids, 100 updates, mean -2.0 -> 0.2)."""
    mdps = sample_grids(GridConfig(), 4, seed=0)
    teacher = make_teacher(mdps, optimal_q(mdps), 0.1)
    _, curve = train(mdps, teacher, TabularConfig(variant="teacher_v_reward", updates=100, eval_every=50), seed=0)
    assert curve.returns[-1].mean() > curve.returns[0].mean() + 4.0


@pytest.mark.slow
def test_control_study_student_driven_reaches_the_teacher_sooner(tmp_path):
    cfg = StudyConfig(mdps=6, temperatures=(0.01,), train=TabularConfig(updates=150, eval_every=5))
    report = run_study("control", cfg, tmp_path, say=lambda s: None, show_progress=False)
    rows = {r["variant"]: r for r in report["rows"]}
    ratio = rows["ratio teacher-driven / student-driven"]
    assert ratio["mdps_with_both"] >= 4 and ratio["ratio_median"] > 1.2
    assert rows["on_policy_distill"]["median_updates_to_reach"] < rows["teacher_distill"]["median_updates_to_reach"]
    assert json.loads((tmp_path / "control.json").read_text())["rows"] == report["rows"]
    assert "teacher-driven / student-driven" in (tmp_path / "control.md").read_text()
    assert rows["teacher_distill"]["median_labels_to_reach"] > 0
    assert (tmp_path / "control.png").read_bytes()[:4] == b"\x89PNG"


def test_actions_study_entropy_regularised_falls_behind_at_many_actions(tmp_path):
    cfg = StudyConfig(actions=(400,), actions_mdps=3, actions_updates=30, train=TabularConfig(eval_every=10))
    report = run_study("actions", cfg, tmp_path, say=lambda s: None, show_progress=False)
    final = {r["variant"]: r["final_return"]["mean"] for r in report["rows"]}
    assert final["expected_entropy_regularised"] > final["entropy_regularised"]
    assert final["on_policy_distill"] > final["entropy_regularised"]


@pytest.mark.parametrize("study", ["actions", "counter"])
def test_a_studys_progress_bar_counts_every_update_it_takes(study):
    from multitask.training.gridworld_studies import RUNNERS, study_updates

    cfg = StudyConfig(actions=(4,), actions_mdps=2, actions_updates=7, counter_rewards=(4.0,), counter_students=2,
                      counter_train=replace(StudyConfig().counter_train, updates=9, episodes=2))
    ticks = []
    RUNNERS[study](cfg, lambda line: None, ticks.append)
    assert sum(ticks) == study_updates(study, cfg) > 0


def test_cyclic_fork_pays_the_previous_branchs_teacher_action():
    mdps, q = cyclic_fork(1, 4.0)
    policy = torch.zeros(1, 13, 3, dtype=torch.float64)
    policy[:, 0, 1] = 1.0  # start -> M_2 (index 1) ...
    policy[:, 1:4, 0] = 1.0  # ... where action 0, M_1's teacher action, pays
    assert policy_values(mdps, policy)[0, 0] == pytest.approx(4.0)
    greedy_teacher = torch.nn.functional.one_hot(q.argmax(-1), 3).to(torch.float64)
    assert policy_values(mdps, greedy_teacher)[0, 0] == pytest.approx(0.0)  # right for a sibling task only
    uniform = torch.full((1, 13, 3), 1 / 3, dtype=torch.float64)
    assert policy_values(mdps, uniform)[0, 0] == pytest.approx(4.0 / 3)
    assert mdps.observation[1:4].unique().numel() == 1  # the middle states are aliased


def test_episodes_per_update_are_all_played_and_counted():
    mdps, q = cyclic_fork(2, 4.0)
    cfg = TabularConfig(variant="on_policy_distill", updates=3, eval_every=1, episodes=5)
    _, curve = train(mdps, make_teacher(mdps, q, 0.1), cfg, seed=0)
    assert curve.labels[-1].tolist() == [3 * 5 * 2, 3 * 5 * 2]  # updates x episodes x two steps each


@pytest.mark.parametrize("variant", ["on_policy_distill+R", "n_distill+R"])
def test_the_expected_updates_closed_form_is_the_mean_sampled_update(variant):
    # the sampled surrogate's gradient, averaged over many episodes, is the closed form's
    mdps, q = cyclic_fork(1, 4.0)
    teacher = make_teacher(mdps, q, 0.1)
    logits = torch.randn(1, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    exact, = torch.autograd.grad(expected_loss(mdps, logits, teacher, variant), logits)
    n = 40_000
    played = mdps.repeat(n)
    played_teacher = teacher.repeat(n)
    ep = rollout(played, "student", logits.detach().repeat(n, 1, 1), played_teacher, 5, torch.Generator().manual_seed(1))
    b_idx = torch.zeros_like(ep["states"])
    loss, _ = surrogate(mdps, teacher, variant, logits, ep, b_idx, torch.zeros(ep["states"].shape, dtype=torch.float64),
                        1.0, teacher.values)
    sampled, = torch.autograd.grad(loss, logits)
    assert torch.allclose(sampled[0, :2], exact[0, :2], atol=0.03), (sampled, exact)
    with pytest.raises(ValueError, match="expected updates exist"):
        expected_loss(mdps, logits, teacher, "teacher_distill")


def test_on_policy_and_n_distill_differ_only_where_visits_move():
    mdps, q = cyclic_fork(1, 4.0)
    teacher = make_teacher(mdps, q, 0.1)
    logits = torch.randn(1, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    on, nd = (torch.autograd.grad(expected_loss(mdps, logits, teacher, v), logits)[0]
              for v in ("on_policy_distill", "n_distill"))
    assert torch.allclose(on[:, 1:], nd[:, 1:])  # the middle row: visits do not depend on it
    assert (on[:, 0] - nd[:, 0]).abs().max() > 0.01  # the start's choice moves the visits


@pytest.mark.slow
def test_counter_study_on_policy_plus_r_cycles_where_n_distill_plus_r_settles(tmp_path):
    cfg = StudyConfig(counter_rewards=(4.0,), counter_students=4,
                      counter_train=replace(StudyConfig().counter_train, updates=2000, lr=0.3))
    report = run_study("counter", cfg, tmp_path, say=lambda s: None, show_progress=False)
    rows = {r["variant"]: r for r in report["rows"]}
    on_policy, n_distill = rows["on_policy_distill+R"], rows["n_distill+R"]
    assert on_policy["late_swing"]["low"] > n_distill["late_swing"]["high"]  # still cycling vs settled
    assert n_distill["final_return"]["mean"] > on_policy["final_return"]["mean"]
    assert on_policy["exact_swing"] > 0.2 and n_distill["exact_swing"] < 0.01  # the expected update itself
    assert "return swing" in (tmp_path / "counter.md").read_text()
    assert (tmp_path / "counter.png").read_bytes()[:4] == b"\x89PNG"


def test_tabular_teacher_v_reward_uses_the_teachers_values():
    """R_hat_t = G_t - V_pi(s_t) on whole episodes, with the teacher's V_pi, not the student's."""
    mdps = sample_grids(GridConfig(), 2, seed=1)
    teacher = make_teacher(mdps, optimal_q(mdps), 0.1)
    logits = torch.zeros(mdps.batch, mdps.num_observations, mdps.num_actions, dtype=torch.float64)
    ep = rollout(mdps, "student", logits, teacher, 40, torch.Generator().manual_seed(0))
    b_idx = torch.arange(mdps.batch).expand_as(ep["states"])
    student_values = torch.full_like(teacher.values, 5.0)
    _, returns = surrogate(mdps, teacher, "teacher_v_reward", logits.requires_grad_(), ep, b_idx,
                           torch.zeros(ep["states"].shape, dtype=torch.float64), 0.9, student_values)
    values = teacher.values[b_idx, ep["states"]]
    g = torch.zeros_like(values)
    last = ep["states"].shape[0] - 1
    for t in range(last, -1, -1):  # the discounted game return (the 40-step cap cuts it, as it cuts R_hat)
        later = g[t + 1] * ep["alive_next"][t] if t < last else 0.0
        g[t] = ep["rewards"][t] + 0.9 * later
    alive = ep["alive"]
    assert torch.allclose((returns * alive)[alive], (g - values)[alive])


def test_control_ratio_leaves_out_mdps_already_at_the_target_when_training_starts(tmp_path):
    """An MDP where no terminal can be reached has teacher = uniform policy = 0: every control "reaches" it at
    update 0, which says nothing about speed (and read as a 0.00x ratio)."""
    cfg = StudyConfig(mdps=4, temperatures=(0.1,), grid=GridConfig(size=8), train=TabularConfig(updates=20))
    report = run_study("control", cfg, tmp_path, say=lambda s: None, show_progress=False)
    rows = {r["variant"]: r for r in report["rows"]}
    assert rows["on_policy_distill"]["reached"] >= 1  # seed 0 holds one such MDP among its four
    ratio = rows["ratio teacher-driven / student-driven"]
    assert ratio["ratio_median"] != 0.0 and ratio["label_ratio_median"] != 0.0


@pytest.mark.parametrize("study, key", [("control", "mdps"), ("actions", "actions_mdps"),
                                        ("counter", "counter_students")])
def test_the_mdps_flag_sets_the_count_of_the_study_it_runs(study, key, run_cli, tmp_path, monkeypatch):
    from multitask.training import gridworld_studies

    seen = {}

    def fake_run(name, cfg, out, show_progress=True):
        seen["cfg"] = cfg
        return {"seconds": 0.0}
    monkeypatch.setattr(gridworld_studies, "run_study", fake_run)
    code, out, err = run_cli("gridworld", study, "--mdps", 3, "--out", tmp_path, "--no-progress")
    assert code == 0, err
    assert getattr(seen["cfg"], key) == 3 and "3 " in out
