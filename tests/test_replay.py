"""The frame-once replay memory must return exactly the observations the env produced."""

import numpy as np
import pytest
import torch

from multitask.envs import get_game, make_vector_env
from multitask.agents.replay import ReplayMemory


@pytest.mark.parametrize("name,capacity", [("atari/Breakout", 600), ("minatar/Breakout", 300)])
def test_sampled_transitions_are_the_real_ones(name, capacity):
    spec = get_game(name)
    n = 3
    env = make_vector_env(spec, n)
    obs = env.reset(seed=0)
    memory = ReplayMemory(capacity, n, spec.frame_shape, spec.stack, seed=0)
    memory.begin_episodes(obs)
    rng = np.random.default_rng(0)
    seen = {}  # transition id (stored in the action field) -> (obs, reward, next_obs)
    tid = 0
    for _ in range(700):  # several wrap-arounds of each env's ring, several episode ends
        step = env.step(rng.integers(0, spec.num_actions, n))
        ids = np.arange(tid, tid + n)
        tid += n
        for i in range(n):
            seen[int(ids[i])] = (obs[i].copy(), step.reward[i], step.next_obs[i].copy(), step.life_lost[i])
        memory.add(ids, step.reward, step.life_lost, step.next_obs, step.done, step.obs)
        obs = step.obs
    sampled = memory.sample(512)  # a stack reaching into overwritten slots would not match `seen`
    assert sampled.window.shape == (512, spec.stack + 1, *spec.frame_shape)  # each frame moved once
    batch = sampled.to(torch.device("cpu"))  # observations stacked on the device (here: the CPU)
    for k in range(512):
        o, r, no, term = seen[int(batch.action[k])]
        assert np.array_equal(batch.obs[k].numpy(), o)
        assert np.array_equal(batch.next_obs[k].numpy(), no)
        assert batch.reward[k].item() == r and bool(batch.terminal[k]) == term


def test_replay_state_round_trip():
    spec = get_game("minatar/Asterix")
    env = make_vector_env(spec, 2)
    m = ReplayMemory(200, 2, spec.frame_shape, 1, seed=1)
    obs = env.reset(seed=0)
    m.begin_episodes(obs)
    for t in range(150):
        step = env.step(np.array([t % 5, 1]))
        m.add(np.array([t, t]), step.reward, step.terminated, step.next_obs, step.done, step.obs)
        obs = step.obs
    m2 = ReplayMemory(200, 2, spec.frame_shape, 1, seed=1)
    m2.load_state_dict(m.state_dict())
    a, b = m.sample(64), m2.sample(64)
    assert all(np.array_equal(x.numpy(), y.numpy()) for x, y in zip(a, b))
