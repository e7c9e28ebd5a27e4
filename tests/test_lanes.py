"""Lanes played in a helper process: the same turns as in the caller, failures reported, nothing left behind."""

import numpy as np
import pytest
import torch

from multitask.envs import get_game
from multitask.data.lanes import RING, LocalLane, RemoteLane
from multitask.agents.networks import MultiHeadNet, teacher_network_spec


def _random_policy(seed: int):
    rng = np.random.default_rng(seed)  # each lane's own generator, copied into the helper at the fork
    return lambda q, obs: np.where(rng.random(len(q)) < 0.5, rng.integers(0, q.shape[1], len(q)), q.argmax(1))


def test_a_helper_lane_plays_the_same_turns_as_a_local_lane():
    game = get_game("minatar/Breakout")
    torch.manual_seed(0)
    net = MultiHeadNet(teacher_network_spec(game))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the recorder and the helper run the teacher
    remote = RemoteLane.start(game, 5, 11, net, 0, _random_policy(3))
    local = LocalLane(game, 5, 11, net, 0, _random_policy(3))
    assert isinstance(remote, RemoteLane)  # the test machines are x86-64 Linux
    try:
        assert np.array_equal(remote.first_obs(), local.first_obs())
        ends = 0
        for t in range(4 * RING + 150):  # the helper runs up to RING turns ahead: the ring wraps many times
            got, want = remote.turn(), local.turn()
            np.testing.assert_allclose(got.outputs, want.outputs, rtol=1e-5, atol=1e-6)
            assert np.array_equal(got.actions, want.actions), t
            for a, b in zip(got.step, want.step):
                assert a.dtype == b.dtype and np.array_equal(a, b), t
            ends += int(want.step.done.sum())
        assert ends >= 3  # episode ends (same-step resets) went through the ring too
    finally:
        remote.close()
        local.close()
        torch.set_num_threads(threads)
    assert not remote._proc.is_alive()


def test_a_failing_helper_lane_is_raised_in_the_caller_and_the_helper_is_gone():
    game = get_game("minatar/Breakout")
    net = MultiHeadNet(teacher_network_spec(game))

    def act(q, obs):
        raise ValueError("no policy here")
    remote = RemoteLane(game, 2, 0, net, 0, act)
    np.testing.assert_array_equal(remote.first_obs().shape, (2, *game.obs_shape))
    with pytest.raises(RuntimeError, match="helper process playing a lane failed: ValueError: no policy here"):
        remote.turn()
    assert not remote._proc.is_alive()
