"""DQN targets and loss against hand-computed values; the learner's update mechanics."""

import copy

import numpy as np
import pytest
import torch

from multitask.agents.dqn import DQNConfig, DQNLearner, epsilon_greedy, linear_schedule, td_loss, td_targets
from multitask.agents.networks import MultiHeadNet, NetworkSpec, TrunkSpec
from multitask.agents.replay import ReplayBatch


def test_double_dqn_target_uses_online_argmax_and_target_value():
    reward = torch.tensor([1.0, 0.5, -1.0])
    terminal = torch.tensor([0.0, 0.0, 1.0])
    next_target = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 1.0], [9.0, 9.0, 9.0]])
    next_online = torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, 7.0], [1.0, 0.0, 0.0]])
    y = td_targets(reward, terminal, next_target, next_online, gamma=0.9)
    # row 0: online argmax 0 -> target 1.0 ; row 1: argmax 2 -> 1.0 ; row 2: terminal
    assert torch.allclose(y, torch.tensor([1.0 + 0.9 * 1.0, 0.5 + 0.9 * 1.0, -1.0]))


def test_dqn_target_uses_max_of_target_net():
    y = td_targets(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]),
                   torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 1.0]]), None, gamma=0.5)
    assert torch.allclose(y, torch.tensor([1.0 + 0.5 * 3.0, 0.5 * 4.0]))


def test_huber_loss_by_hand():
    q = torch.tensor([[1.0, 2.0], [0.0, 5.0]])
    action = torch.tensor([1, 0])
    target = torch.tensor([2.5, 3.0])
    # errors: 2.0 - 2.5 = -0.5 (quadratic: 0.125) ; 0 - 3 = -3 (linear: 3 - 0.5 = 2.5)
    assert td_loss(q, action, target).item() == pytest.approx((0.125 + 2.5) / 2)


def test_epsilon_greedy_and_schedule():
    rng = np.random.default_rng(0)
    q = torch.tensor([[0.0, 1.0, 0.0]]).repeat(1000, 1)
    assert (epsilon_greedy(q, 0.0, rng) == 1).all()
    frac_greedy = (epsilon_greedy(q, 0.3, rng) == 1).mean()
    assert frac_greedy == pytest.approx(0.7 + 0.3 / 3, abs=0.05)
    assert linear_schedule(1.0, 0.1, 100, 0) == 1.0
    assert linear_schedule(1.0, 0.1, 100, 50) == pytest.approx(0.55)
    assert linear_schedule(1.0, 0.1, 100, 1000) == pytest.approx(0.1)


def test_learner_fits_a_fixed_target_and_copies_target_net():
    torch.manual_seed(0)
    net = MultiHeadNet(NetworkSpec(TrunkSpec("minatar", 2, 10, width=0.5), ("g",), (3,)))
    learner = DQNLearner(net, DQNConfig(lr=1e-3, batch_size=16, target_update_every=5, gamma=0.0, reward_clip=False))
    obs = torch.randint(0, 2, (16, 2, 10, 10), dtype=torch.uint8)
    batch = ReplayBatch(obs, torch.randint(0, 3, (16,)), torch.linspace(-1, 1, 16), torch.ones(16), obs)
    first = learner.update(batch)["loss"]
    for _ in range(300):
        last = learner.update(batch)["loss"]
    assert last < 0.05 * first  # gamma 0: the target is the reward, a supervised problem
    assert learner.updates == 301
    # the target net was copied at update 300 and differs from the online net only by one step
    for p, t in zip(learner.net.parameters(), learner.target.parameters()):
        assert torch.allclose(p, t, atol=1e-2)


def test_learner_uses_fused_adam_and_resumes_an_unfused_run_fused():
    """The learner's Adam is torch's fused one (same rule as the per-tensor loop, a faster kernel);
    a state saved by a per-tensor optimizer (runs saved before the switch) resumes fused, and its
    next steps follow the per-tensor optimizer's to rounding."""
    torch.manual_seed(0)
    spec = NetworkSpec(TrunkSpec("minatar", 2, 10, width=0.5), ("g",), (3,))
    cfg = DQNConfig(lr=1e-3, batch_size=16, gamma=0.5, reward_clip=False)
    obs = torch.randint(0, 2, (16, 2, 10, 10), dtype=torch.uint8)
    batch = ReplayBatch(obs, torch.randint(0, 3, (16,)), torch.linspace(-1, 1, 16), torch.zeros(16), obs)
    old = DQNLearner(MultiHeadNet(spec), cfg)
    assert old.optimizer.param_groups[0]["fused"] is True
    old.optimizer = torch.optim.Adam(old.net.parameters(), lr=cfg.lr, eps=cfg.adam_eps, foreach=False)
    for _ in range(5):
        old.update(batch)
    resumed = DQNLearner(MultiHeadNet(spec), cfg)
    resumed.load_state_dict(copy.deepcopy(old.state_dict()))  # as from disk: no tensors shared
    assert resumed.optimizer.param_groups[0]["fused"] is True
    for _ in range(5):
        old.update(batch)
        resumed.update(batch)
    for p, q in zip(old.net.parameters(), resumed.net.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-6)
    assert not all(torch.equal(p, q) for p, q in zip(old.net.parameters(), MultiHeadNet(spec).parameters()))
