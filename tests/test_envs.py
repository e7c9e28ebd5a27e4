"""Suite registry, action sets, and the observations the envs give (real ALE and MinAtar)."""

import numpy as np
import pytest

from multitask.envs import get_game, known_games, make_vector_env
from multitask.errors import UserError


def test_minatar_games_have_their_minimal_action_sets():
    expected = {"Asterix": 5, "Breakout": 3, "Freeway": 3, "Seaquest": 6, "SpaceInvaders": 4}
    channels = {"Asterix": 4, "Breakout": 4, "Freeway": 7, "Seaquest": 10, "SpaceInvaders": 6}
    assert known_games("minatar") == [f"minatar/{g}" for g in expected]
    for game, n in expected.items():
        spec = get_game(f"minatar/{game}")
        assert spec.num_actions == n
        assert spec.obs_shape == (channels[game], 10, 10)
        assert spec.action_meanings[0] == "NOOP"
    assert get_game("minatar/Breakout").action_meanings == ("NOOP", "LEFT", "RIGHT")


def test_atari_games_have_their_minimal_action_sets():
    assert get_game("atari/Pong").action_meanings == ("NOOP", "FIRE", "RIGHT", "LEFT", "RIGHTFIRE", "LEFTFIRE")
    assert get_game("atari/Breakout").num_actions == 4
    assert get_game("atari/MsPacman").num_actions == 9
    assert get_game("atari/Seaquest").num_actions == 18
    assert get_game("atari/Pong").obs_shape == (4, 84, 84)
    assert "atari/SpaceInvaders" in known_games("atari")


def test_unknown_game_lists_the_known_ones():
    with pytest.raises(UserError) as e:
        get_game("atari/Pongg")
    msg = str(e.value)
    assert "atari/Pong" in msg and "minatar/Breakout" in msg and "did you mean" in msg
    with pytest.raises(UserError):
        get_game("Breakout")  # no suite


@pytest.mark.parametrize("name", ["atari/Breakout", "minatar/Seaquest"])
def test_step_gives_true_successors_and_fresh_starts(name):
    """Stacks slide within an episode; at episode ends next_obs is the final obs, obs a new start."""
    spec = get_game(name)
    env = make_vector_env(spec, 4)
    obs = env.reset(seed=3)
    rng = np.random.default_rng(0)
    c = spec.frame_shape[0]
    dones = 0
    for _ in range(1500 if spec.suite == "atari" else 400):
        step = env.step(rng.integers(0, spec.num_actions, 4))
        assert step.obs.dtype == np.uint8 and step.obs.shape == (4, *spec.obs_shape)
        if spec.stack > 1:  # the successor's older frames are the previous obs's newer frames
            assert np.array_equal(step.next_obs[:, : -c], obs[:, c:])
        live = ~step.done
        assert np.array_equal(step.next_obs[live], step.obs[live])
        assert (step.life_lost[step.terminated]).all()
        dones += int(step.done.sum())
        obs = step.obs
    assert dones > 0
    env.close()


def test_atari_life_loss_does_not_end_the_game():
    """Training ends episodes at a lost life; the env itself plays whole games (Breakout: 5 lives)."""
    env = make_vector_env("atari/Breakout", 1)
    env.reset(seed=1)
    rng = np.random.default_rng(1)
    lives_lost, steps = 0, 0
    while True:
        step = env.step(rng.integers(0, 4, 1))
        steps += 1
        lives_lost += int(step.life_lost[0])
        if step.done[0]:
            break
    assert step.terminated[0] and lives_lost == 5
    env.close()


@pytest.mark.slow
def test_noop_starts_vary_the_start():
    """Up to 30 random no-ops: identical play from the reset diverges across envs, yet is seeded."""
    def play(seed):
        env = make_vector_env("atari/Pong", 8)
        env.reset(seed=seed)
        for _ in range(40):  # Pong's screen is static for its first frames; let the ball fly
            step = env.step(np.zeros(8, dtype=np.int64))
        env.close()
        return step.obs
    obs = play(0)
    assert len({obs[i].tobytes() for i in range(8)}) >= 3
    assert np.array_equal(obs, play(0))


def test_minatar_vector_env_is_seeded():
    a = make_vector_env("minatar/Asterix", 2)
    b = make_vector_env("minatar/Asterix", 2)
    assert np.array_equal(a.reset(seed=5), b.reset(seed=5))
    for t in range(50):
        acts = np.full(2, t % 5)
        sa, sb = a.step(acts), b.step(acts)
        assert np.array_equal(sa.obs, sb.obs) and np.array_equal(sa.reward, sb.reward)


def test_a_stack_is_the_frames_ending_at_its_own_oldest_first():
    """Frame-once storage: observation s_t is rows [i - k + 1, i], oldest first, i its own frame's
    row; at an episode's start those are its k - 1 pad rows and s_0's (no clamping: the pads are stored)."""
    from multitask.envs.framestack import join_frames, newest_frame, split_frames, stack_indices

    assert stack_indices(np.array([5]), 4).tolist() == [[2, 3, 4, 5]]
    assert stack_indices(np.array([3, 10]), 4).tolist() == [[0, 1, 2, 3], [7, 8, 9, 10]]  # s_0 of episodes at 0, 7
    assert stack_indices(np.array([5, 6]), 1).tolist() == [[5], [6]]
    frames = np.arange(2 * 4 * 2 * 3 * 3, dtype=np.uint8).reshape(2, 4, 2, 3, 3)  # (B, k, C, H, W)
    obs = join_frames(frames)
    assert obs.shape == (2, 8, 3, 3) and np.array_equal(obs[:, :2], frames[:, 0])  # oldest frame first
    assert np.array_equal(newest_frame(obs, 2), frames[:, 3]) and np.array_equal(split_frames(obs, 2), frames)
