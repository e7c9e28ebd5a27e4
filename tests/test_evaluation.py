"""The one evaluation protocol: whole games, raw scores, unbiased parallel episodes, seeded."""

import pytest
import torch

from multitask.envs import get_game
from multitask.evaluation.protocol import evaluate_game, quotas
from multitask.agents.networks import MultiHeadNet, teacher_network_spec


def _net(game):
    torch.manual_seed(0)
    return MultiHeadNet(teacher_network_spec(get_game(game)))


@pytest.mark.slow
def test_atari_evaluation_plays_whole_games_with_raw_scores():
    """Space Invaders: 3 lives, aliens worth 5-30 points. A per-life or clipped evaluator would
    report small integers; the protocol reports whole-game raw scores."""
    game = get_game("atari/SpaceInvaders")
    scores = evaluate_game(_net(game.name), game, episodes=2, seed=0, epsilon=1.0)
    assert len(scores.returns) == 2
    assert all(r % 5 == 0 for r in scores.returns)  # raw point values, not clipped +1s
    assert max(scores.returns) > 60  # more than one alien row's worth: not a single life
    assert not any(scores.truncated)
    p = scores.protocol
    assert p["epsilon"] == 1.0 and p["noop_max"] == 30 and p["max_episode_frames"] == 108_000


def test_minatar_evaluation_is_seeded_and_counts_episodes():
    game = get_game("minatar/Breakout")
    net = _net(game.name)
    a = evaluate_game(net, game, episodes=7, seed=11, num_envs=3, epsilon=1.0)
    b = evaluate_game(net, game, episodes=7, seed=11, num_envs=3, epsilon=1.0)
    c = evaluate_game(net, game, episodes=7, seed=12, num_envs=3, epsilon=1.0)
    assert len(a.returns) == len(a.lengths) == 7
    assert a.returns == b.returns and a.lengths == b.lengths
    assert a.lengths != c.lengths
    assert a.protocol["max_episode_steps"] == 10_000


def test_quotas_are_fixed_per_env():
    assert quotas(7, 3).tolist() == [3, 2, 2]
    assert quotas(2, 8).sum() == 2


def test_short_episodes_are_not_favoured():
    """Each env contributes exactly its quota of episodes, however long they are, instead of the
    first episodes to finish (which would over-sample short, low-scoring games)."""
    game = get_game("minatar/Breakout")
    scores = evaluate_game(_net(game.name), game, episodes=7, seed=5, num_envs=3, epsilon=1.0)
    assert sorted(scores.env_index) == [0, 0, 0, 1, 1, 2, 2]
    assert len(set(scores.lengths)) > 1  # episodes of different lengths were all kept


def test_the_protocol_pins_epsilon_caps_and_starts():
    """docs/evaluation.md: epsilon 0.05 (Mnih et al. 2015) by default everywhere; Atari capped at
    108,000 frames (27,000 steps of 4) with up to 30 no-ops and no sticky actions; MinAtar capped at
    10,000 steps with its own sticky actions and no no-ops."""
    import inspect

    from multitask.evaluation.protocol import EVAL_EPSILON, evaluate_games, protocol

    assert EVAL_EPSILON == 0.05
    for f in (evaluate_game, evaluate_games):
        assert inspect.signature(f).parameters["epsilon"].default == 0.05
    m = protocol(get_game("minatar/Breakout"))
    assert (m["epsilon"], m["max_episode_steps"], m["max_episode_frames"], m["noop_max"], m["sticky_action_prob"]) \
        == (0.05, 10_000, None, None, 0.1)
    a = protocol(get_game("atari/Breakout"))
    assert (a["epsilon"], a["max_episode_steps"], a["max_episode_frames"], a["noop_max"], a["sticky_action_prob"]) \
        == (0.05, 27_000, 108_000, 30, 0.0)
    assert "never clipped" in a["score"] and "quotas" in a["episode_assignment"]
    assert protocol(get_game("minatar/Breakout"), epsilon=1.0)["epsilon"] == 1.0  # the random-policy reference
