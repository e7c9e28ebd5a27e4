"""Lanes played in a helper process, and the teacher's inference server: the same turns and outputs
as in the caller, failures reported, nothing left behind."""

import numpy as np
import pytest
import torch

from multitask.envs import get_game
from multitask.data.inference import InferenceServer, NetForward
from multitask.data.lanes import RING, LocalLane, RemoteLane
from multitask.agents.networks import MultiHeadNet, NetworkSpec, TrunkSpec, teacher_network_spec


def _random_policy(seed: int):
    rng = np.random.default_rng(seed)  # each lane's own generator, copied into the helper at the fork
    return lambda q, obs: np.where(rng.random(len(q)) < 0.5, rng.integers(0, q.shape[1], len(q)), q.argmax(1))


def test_a_helper_lane_plays_the_same_turns_as_a_local_lane():
    game = get_game("minatar/Breakout")
    torch.manual_seed(0)
    net = MultiHeadNet(teacher_network_spec(game))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the recorder and the helper run the teacher
    remote = RemoteLane.start(game, 5, 11, NetForward(net, 0), _random_policy(3))
    local = LocalLane(game, 5, 11, NetForward(net, 0), _random_policy(3))
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
    remote = RemoteLane(game, 2, 0, NetForward(net, 0), act)
    np.testing.assert_array_equal(remote.first_obs().shape, (2, *game.obs_shape))
    with pytest.raises(RuntimeError, match="helper process playing a lane failed: ValueError: no policy here"):
        remote.turn()
    assert not remote._proc.is_alive()


def test_the_inference_server_answers_each_lane_with_its_own_forward_pass_exactly():
    """Two lanes of different sizes, one played in a helper and one here, both through the server:
    every turn's outputs equal the in-lane forward pass bit for bit, and so do the lanes' turns."""
    game = get_game("minatar/Breakout")
    torch.manual_seed(0)
    net = MultiHeadNet(teacher_network_spec(game))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    server = InferenceServer(net, 0, "cpu", [3, 5], game.obs_shape, game.num_actions)
    server.wait_ready()  # the teacher loaded and a forward pass of each lane size run
    served = server.clients()
    remote = RemoteLane.start(game, 3, 7, served[0], _random_policy(1))
    local = LocalLane(game, 5, 10, served[1], _random_policy(2))
    mirrors = [LocalLane(game, 3, 7, NetForward(net, 0), _random_policy(1)),
               LocalLane(game, 5, 10, NetForward(net, 0), _random_policy(2))]
    try:
        for t in range(2 * RING + 40):
            for lane, mirror in zip((remote, local), mirrors):
                got, want = lane.turn(), mirror.turn()
                assert np.array_equal(got.outputs, want.outputs), t
                assert np.array_equal(got.actions, want.actions) and np.array_equal(got.step.obs, want.step.obs), t
    finally:
        for lane in (remote, local, *mirrors):
            lane.close()
        server.close()
        torch.set_num_threads(threads)
    assert not server._proc.is_alive()


@pytest.mark.slow
def test_a_failing_inference_server_is_raised_in_every_lane_and_nothing_hangs():
    game = get_game("minatar/Breakout")
    wrong = MultiHeadNet(NetworkSpec(TrunkSpec("minatar", 2, 10), ("g",), (3,)))  # 2 input channels, Breakout has 4
    server = InferenceServer(wrong, 0, "cpu", [2, 2], game.obs_shape, game.num_actions)
    here, there = server.clients()
    remote = RemoteLane(game, 2, 0, there, _random_policy(0))
    try:
        with pytest.raises(RuntimeError, match="inference server failed: RuntimeError: .*channels"):
            server.wait_ready()  # its warm-up pass fails, before any lane asks
        with pytest.raises(RuntimeError, match="inference server failed: RuntimeError: .*channels"):
            here(np.zeros((2, *game.obs_shape), np.uint8))
        with pytest.raises(RuntimeError, match="lane failed: RuntimeError: the teacher's inference server failed"):
            remote.turn()
    finally:
        remote.close()
        server.close()
    assert not server._proc.is_alive() and not remote._proc.is_alive()
