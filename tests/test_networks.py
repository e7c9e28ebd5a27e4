"""The multi-head network and the size presets: grouped forward passes, parameter counts."""

from dataclasses import replace

import pytest
import torch

from multitask.agents.networks import MultiHeadNet, count_parameters
from multitask.agents.sizes import (SIZE_FRACTIONS, parameter_count, preset_shape, sized_network,
                                    width_for_parameters)
from multitask.envs import get_game
from multitask.errors import UserError

PRESETS = (*SIZE_FRACTIONS, "multitask", "custom")
GAME_SETS = (("minatar/Breakout",), ("minatar/Breakout", "minatar/Freeway", "minatar/Asterix"),
             ("atari/Pong",), ("atari/Pong", "atari/Breakout"))


def test_grouped_forward_equals_each_games_forward_on_its_rows():
    games = [get_game(g) for g in ("minatar/Breakout", "minatar/Freeway", "minatar/Asterix")]
    torch.manual_seed(0)
    net = MultiHeadNet(sized_network("100%", games)[0])
    obs = torch.randint(0, 2, (10, 7, 10, 10), dtype=torch.uint8)  # Freeway's 7 channels: the trunk's
    groups = [(2, slice(0, 3)), (0, slice(3, 8)), (1, slice(8, 10))]  # heads in any order
    with torch.no_grad():
        grouped = net(obs, groups=groups)
        for (head, rows), out in zip(groups, grouped):
            alone = net(obs[rows], games[head].name)
            assert out.shape == (rows.stop - rows.start, games[head].num_actions)
            assert torch.allclose(out, alone, atol=1e-6)


@pytest.mark.parametrize("games", GAME_SETS, ids=lambda g: "+".join(x.split("/")[1] for x in g))
def test_parameter_count_is_the_built_networks_for_every_preset(games):
    specs = [get_game(g) for g in games]
    for size in PRESETS:
        spec, sized = sized_network(size, specs, width=0.7, extra_fc=2)  # width, extra_fc: custom only
        net = MultiHeadNet(spec)
        assert parameter_count(spec.trunk, spec.num_actions) == count_parameters(net) == sized.parameters, size
        one_head = MultiHeadNet(replace(spec, games=spec.games[:1], num_actions=spec.num_actions[:1]))
        assert sized.one_head == count_parameters(one_head), size
        teacher = MultiHeadNet(sized_network("100%", specs[:1])[0])
        assert sized.teachers[games[0]] == count_parameters(teacher)


def test_presets_reach_their_targets_with_the_smallest_width():
    games = [get_game(g) for g in ("minatar/Breakout", "minatar/Freeway")]
    spec, sized = sized_network("multitask", games)
    assert spec.trunk.extra_fc == 1 and sized.fraction_of_mean_teacher == pytest.approx(4.0, rel=0.01)
    assert sized.fraction_of_mean_teacher >= 4.0
    narrower = replace(spec.trunk, width=spec.trunk.width - 1e-4)
    assert parameter_count(narrower, spec.num_actions) < 4.0 * sum(sized.teachers.values()) / 2
    custom, _ = sized_network("custom", games, width=0.7, extra_fc=2)
    assert (custom.trunk.width, custom.trunk.extra_fc, custom.trunk.in_channels) == (0.7, 2, 7)


def test_width_for_parameters_is_the_smallest_width_reaching_the_target():
    trunk = sized_network("100%", [get_game("atari/Pong")])[0].trunk
    for target in (50_000, 400_000, 3_000_000):
        w = width_for_parameters(trunk, [6], target)
        assert parameter_count(replace(trunk, width=w), [6]) >= target
        assert parameter_count(replace(trunk, width=w - 1e-4), [6]) < target


@pytest.mark.parametrize("conv_width", [1.0, 0.0])
def test_strided_shape_keeps_conv_channels_and_reaches_every_fraction(conv_width):
    games = [get_game("minatar/Seaquest")]
    for size, fraction in SIZE_FRACTIONS.items():
        spec, sized = sized_network(size, games, shape="strided", conv_width=conv_width)
        convs, hidden = spec.trunk.layer_sizes()
        assert [(k, s) for _, k, s in convs] == [(3, 1), (2, 2)]  # the teacher's conv, then the strided one
        if conv_width == 1.0:
            assert [c for c, _, _ in convs] == [16, 16]  # the bisection shrank the FC only
        net = MultiHeadNet(spec)
        assert count_parameters(net) == sized.parameters
        assert net.trunk.fcs[0].in_features == convs[-1][0] * 4 * 4  # 10x10 -> 8x8 -> 4x4
        assert sized.fraction_of_teacher >= fraction
        narrower = replace(spec.trunk, width=spec.trunk.width - 1e-4)
        assert parameter_count(narrower, spec.num_actions) < fraction * sized.teachers["minatar/Seaquest"] or \
            fraction == 1.0
        assert net(torch.zeros(2, 10, 10, 10, dtype=torch.uint8)).shape == (2, 6)


def test_strided_shape_is_refused_for_atari_and_flat_for_minatar():
    with pytest.raises(UserError, match="for MinAtar networks"):
        sized_network("7%", [get_game("atari/Pong")], shape="strided")
    with pytest.raises(UserError, match="for Atari networks"):
        sized_network("7%", [get_game("minatar/Breakout")], shape="flat")


@pytest.mark.parametrize("size", ["7%", "4%"])
def test_small_atari_presets_are_paper_as_students(size):
    """Paper A's 7% and 4% Atari students: three convs of 16 channels with the Nature kernels and
    strides, a shrunk FC (paper A: 128 and 64 units at 6.7% and 3.7%; here the fraction is 7% / 4%)."""
    games = [get_game("atari/Pong")]
    shape, conv_width = preset_shape(size, ["atari/Pong"])
    spec, sized = sized_network(size, games, shape=shape, conv_width=conv_width)
    convs, hidden = spec.trunk.layer_sizes()
    assert convs == ((16, 8, 4), (16, 4, 2), (16, 3, 1))
    assert {"7%": 136, "4%": 72}[size] == hidden
    net = MultiHeadNet(spec)
    assert count_parameters(net) == sized.parameters
    assert sized.fraction_of_teacher >= SIZE_FRACTIONS[size]
    assert net(torch.zeros(2, 4, 84, 84, dtype=torch.uint8)).shape == (2, 6)


def test_a_100pct_student_with_its_own_conv_width_still_has_a_teachers_parameters():
    """size 100% skipped the width search whenever the shape was uniform, so conv_width 0.5 built a
    network of half a teacher's parameters that its name and preset called 100%."""
    games = [get_game("minatar/Breakout")]
    for conv_width in (0.5, 2.0):
        _, sized = sized_network("100%", games, shape="uniform", conv_width=conv_width)
        assert sized.fraction_of_teacher == pytest.approx(1.0, rel=0.01), conv_width
    spec, sized = sized_network("100%", games)
    assert spec.trunk.width == 1.0 and sized.fraction_of_teacher == 1.0  # the teacher's own architecture


def test_sizes_whose_layers_round_to_zero_units_are_refused():
    """Layer sizes are kept at 1 unit at least (so a width search can count any width); a size whose
    layers round to 0 is refused rather than built as a 1-unit network."""
    games = [get_game("minatar/Breakout")]
    with pytest.raises(UserError, match=r"conv 1 \(16 x 0.001\), FC \(128 x 0.001\) with no units"):
        sized_network("custom", games, width=0.001)
    with pytest.raises(UserError, match=r"conv 1 \(16 x 0.01\), conv 2 \(16 x 0.01\) with no units"):
        sized_network("7%", games, shape="strided", conv_width=0.01)
    spec, _ = sized_network("custom", games, width=0.04)  # 0.64 conv channels round to 1, 5.12 FC units to 5
    assert spec.trunk.layer_sizes() == (((1, 3, 1),), 5)


@pytest.mark.parametrize("size", ["25%", "7%", "4%"])
def test_a_multi_game_student_at_a_fraction_has_that_fraction_with_one_head(size):
    """The width search counted the first game's teacher trunk (Asterix: 4 input channels) while the
    student's trunk takes every game's (10): a five-game 4% student was 4.7% with one head."""
    names = ["minatar/Asterix", "minatar/Breakout", "minatar/Freeway", "minatar/Seaquest", "minatar/SpaceInvaders"]
    shape, conv_width = preset_shape(size, names)
    spec, sized = sized_network(size, [get_game(g) for g in names], shape=shape, conv_width=conv_width)
    assert spec.trunk.in_channels == 10
    assert sized.fraction_of_teacher == pytest.approx(SIZE_FRACTIONS[size], rel=0.02)
