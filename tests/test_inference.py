"""The teacher's helper process: same answers as in-process, failures reported, nothing left behind."""

import numpy as np
import pytest
import torch

from multitask.envs import get_game
from multitask.inference import LocalNet, RemoteNet
from multitask.networks import MultiHeadNet, teacher_network_spec


def test_remote_answers_equal_local_ones_on_interleaved_lanes():
    game = get_game("minatar/Breakout")
    torch.manual_seed(0)
    net = MultiHeadNet(teacher_network_spec(game))
    sizes = [5, 3]  # uneven lanes, as when --num-envs is odd

    def policy(generators):  # random actions from one generator per lane, as the recorder's act
        return lambda lane, q: generators[lane].integers(0, q.shape[1], len(q))
    remote = RemoteNet.start(net, 0, sizes, game.obs_shape, game.num_actions,
                             policy([np.random.default_rng(k) for k in range(2)]))
    local = LocalNet(net, 0, len(sizes), policy([np.random.default_rng(k) for k in range(2)]))
    assert isinstance(remote, RemoteNet)  # the test machines are x86-64 Linux
    rng = np.random.default_rng(0)
    try:
        for step in range(50):
            batches = [rng.integers(0, 2, (n, *game.obs_shape), dtype=np.uint8) for n in sizes]
            for k in range(len(sizes)):  # both lanes in flight before either answer is read
                remote.submit(k, batches[k])
                local.submit(k, batches[k])
            for k in reversed(range(len(sizes))):
                got, want = remote.result(k), local.result(k)
                assert got.outputs.shape == (sizes[k], game.num_actions) and got.actions.shape == (sizes[k],)
                np.testing.assert_allclose(got.outputs, want.outputs, rtol=1e-5, atol=1e-6)
                # the helper's copy of each lane's generator draws the same actions as the caller's
                assert np.array_equal(got.actions, want.actions)
    finally:
        remote.close()
    assert not remote._proc.is_alive()


def test_a_failing_forward_is_raised_in_the_caller_and_the_helper_is_gone():
    game = get_game("minatar/Breakout")
    other = get_game("atari/Pong")  # a MinAtar net cannot take 84x84 frames
    net = MultiHeadNet(teacher_network_spec(game))
    remote = RemoteNet(net, 0, [2], other.obs_shape, game.num_actions)
    remote.submit(0, np.zeros((2, *other.obs_shape), dtype=np.uint8))
    with pytest.raises(RuntimeError, match="teacher's helper process failed: RuntimeError"):
        remote.result(0)
    assert not remote._proc.is_alive()
