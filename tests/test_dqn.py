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
    initial = [p.detach().clone() for p in old.net.parameters()]
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
    # the updates moved the weights (the resumed net matching the old one is no tautology)
    assert not any(torch.allclose(p, q, rtol=0, atol=1e-4) for p, q in zip(old.net.parameters(), initial))


SPEC = NetworkSpec(TrunkSpec("minatar", 2, 10, width=0.5), ("g",), (3,))


def _batch(n: int = 16, reward=None, terminal: float = 0.0, seed: int = 0) -> ReplayBatch:
    g = torch.Generator().manual_seed(seed)
    obs = torch.randint(0, 2, (n, 2, 10, 10), dtype=torch.uint8, generator=g)
    next_obs = torch.randint(0, 2, (n, 2, 10, 10), dtype=torch.uint8, generator=g)
    reward = torch.linspace(-1, 1, n) if reward is None else reward
    return ReplayBatch(obs, torch.randint(0, 3, (n,), generator=g), reward, torch.full((n,), terminal), next_obs)


def _perturbed_learner(cfg: DQNConfig) -> tuple[DQNLearner, MultiHeadNet]:
    """A learner whose online net no longer equals its target net, and an independent copy of the
    net the target was built from (so that an aliased or online target cannot pass for it)."""
    torch.manual_seed(0)
    net = MultiHeadNet(SPEC)
    original = copy.deepcopy(net)
    learner = DQNLearner(net, cfg)
    with torch.no_grad():
        for p in learner.net.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return learner, original


@pytest.mark.parametrize("double", [False, True])
def test_update_bootstraps_on_the_target_net_without_gradient_through_it(double):
    """terminal 0, gamma 0.9: the loss is Huber(Q_online(s, a) - y) with y from the TARGET net
    (double: the action argmax of the ONLINE net at s', valued by the target net), and the
    gradient is that of the loss with y a constant: nothing flows into or through the target."""
    cfg = DQNConfig(lr=1e-3, gamma=0.9, double=double, reward_clip=False, max_grad_norm=0.0,
                    target_update_every=1000)
    learner, original = _perturbed_learner(cfg)
    online = copy.deepcopy(learner.net)  # the online net before the step, for the expectation
    batch = _batch()
    with torch.no_grad():
        next_target, next_online = original(batch.next_obs), online(batch.next_obs)
    y = td_targets(batch.reward, batch.terminal, next_target, next_online if double else None, cfg.gamma)
    # the case discriminates: bootstrapping on the online net, or (double) taking the argmax on the
    # target net, gives other targets
    assert not torch.allclose(y, td_targets(batch.reward, batch.terminal, next_online,
                                            next_online if double else None, cfg.gamma), atol=1e-3)
    if double:
        assert (next_online.argmax(1) != next_target.argmax(1)).any()
        assert not torch.allclose(y, td_targets(batch.reward, batch.terminal, next_target, None, cfg.gamma), atol=1e-3)
    expected = td_loss(online(batch.obs), batch.action, y, cfg.huber_delta)
    expected.backward()
    # grad mode is off for every forward pass that makes the targets: no graph is built for them
    grad_mode = {"online": [], "target": []}
    learner.net.register_forward_hook(lambda *_: grad_mode["online"].append(torch.is_grad_enabled()))
    learner.target.register_forward_hook(lambda *_: grad_mode["target"].append(torch.is_grad_enabled()))
    out = learner.update(batch)
    assert out["loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert grad_mode == {"online": [False, True] if double else [True], "target": [False]}
    assert all(p.grad is None for p in learner.target.parameters())
    for (name, p), q in zip(learner.net.named_parameters(), online.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7), name
    for p, q in zip(learner.target.parameters(), original.parameters()):
        assert torch.equal(p, q)  # not a copy yet: the target is still the net it was built from


def test_update_clips_rewards_to_plus_minus_one():
    """gamma 0 and terminal: y is the clipped reward, so the loss is Huber(Q - clip(r, -1, 1))."""
    torch.manual_seed(0)
    net = MultiHeadNet(SPEC)
    reward = torch.tensor([5.0, -5.0, 0.5, 1.5])
    batch = _batch(4, reward=reward, terminal=1.0)
    with torch.no_grad():
        q = net(batch.obs)
    clipped = td_loss(q, batch.action, torch.tensor([1.0, -1.0, 0.5, 1.0])).item()
    raw = td_loss(q, batch.action, reward).item()
    assert abs(clipped - raw) > 0.5
    assert DQNLearner(copy.deepcopy(net), DQNConfig(gamma=0.0, reward_clip=True)).update(batch)["loss"] == \
        pytest.approx(clipped, rel=1e-5)
    assert DQNLearner(copy.deepcopy(net), DQNConfig(gamma=0.0, reward_clip=False)).update(batch)["loss"] == \
        pytest.approx(raw, rel=1e-5)


def test_target_net_is_copied_every_n_updates_exactly():
    torch.manual_seed(0)
    learner = DQNLearner(MultiHeadNet(SPEC), DQNConfig(lr=1e-2, gamma=0.9, target_update_every=7, reward_clip=False))
    initial = copy.deepcopy(learner.net.state_dict())
    batch, after = _batch(), {}
    for i in range(1, 11):
        learner.update(batch)
        after[i] = copy.deepcopy(learner.net.state_dict())
        if i < 7:  # no copy yet: the target is the initial net
            assert all(torch.equal(learner.target.state_dict()[k], v) for k, v in initial.items()), i
    target = learner.target.state_dict()

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)
    assert same(target, after[7])
    assert not same(target, after[6]) and not same(target, after[8]) and not same(target, after[10])
