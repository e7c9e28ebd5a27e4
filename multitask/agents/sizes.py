"""Network sizes: parameter counts from a spec, and the size presets of students (and of the
multi-task DQN, which shares the student's architecture).

A preset is relative to the teachers: `100%`, `25%`, `7%`, `4%` give a one-head network with that
fraction of a teacher's parameters (Rusu et al. 2016's compression study); `multitask` gives a
network with `MULTITASK_FACTOR` times the mean teacher's parameters, heads included, and one extra
hidden FC layer (Rusu et al. 2016's multi-task student); `custom` takes width and extra FC layers
as given. Fractions are reached by scaling the trunk's width, found by one bisection
(`width_for_parameters`). The trunk's `shape` (networks.TrunkShape) and `conv_width` go through
every preset: `strided` with conv_width 1 keeps the teacher's conv channels and lets the bisection
shrink the FC units only.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Literal, NamedTuple, Sequence

import numpy as np

from multitask.agents.networks import (MINATAR_HIDDEN, NATURE_HIDDEN, NetworkSpec, TrunkShape, TrunkSpec,
                                       teacher_network_spec)
from multitask.envs import GameSpec
from multitask.errors import UserError

SizePreset = Literal["100%", "25%", "7%", "4%", "multitask", "custom"]
SIZE_FRACTIONS = {"100%": 1.0, "25%": 0.25, "7%": 0.07, "4%": 0.04}  # Rusu et al. 2016, compression
MULTITASK_FACTOR = 4.0  # Rusu et al. 2016: the multi-task student had ~4x a teacher's parameters
MULTITASK_EXTRA_FC = 1  # Rusu et al. 2016: ... and one more hidden FC layer than a teacher
# The trunk shape a student's size preset picks (`shape = "preset"`), by suite: MinAtar students at 7%
# and 4% keep the teacher's 16 conv channels behind a strided conv and shrink the FC (docs/results.md,
# "Compression", KL tau 0.1, three seeds: 88% vs 77% of the teachers at 7%, 70% vs 56% at 4%).
# Atari students at 7% and 4% take paper A's: three convs of 16 channels (`flat` at conv_width 0.5 of
# Nature's 32) and a shrunk FC (paper A: FC 128 at 7%, 64 at 4%). Any other preset and suite: uniform
# (Atari at 25% is then paper A's conv 16/32/32, FC 255 against its 256).
PRESET_SHAPES: dict[tuple[str, str], tuple[TrunkShape, float]] = {
    ("minatar", "7%"): ("strided", 1.0), ("minatar", "4%"): ("strided", 1.0),
    ("atari", "7%"): ("flat", 0.5), ("atari", "4%"): ("flat", 0.5)}
WIDTH_RANGE = (1e-3, 16.0)  # bisection bounds: from a near-empty trunk to 16x a teacher's (~256x its parameters)
WIDTH_DECIMALS = 4  # widths are rounded up to 4 decimals, so that configs hold short numbers


def empty_layers(trunk: TrunkSpec) -> list[str]:
    """The layers whose width-scaled size rounds to 0 units (TrunkSpec.layer_sizes keeps them at 1,
    so that a bisection can count any width): `conv 1 (16 x 0.01)`, `FC (128 x 0.001)`."""
    convs, _ = replace(trunk, width=1.0, conv_width=0.0).layer_sizes()
    conv_width = trunk.conv_width or trunk.width
    hidden = NATURE_HIDDEN if trunk.kind == "nature" else MINATAR_HIDDEN
    out = [f"conv {i + 1} ({c} x {conv_width:g})" for i, (c, _, _) in enumerate(convs) if round(c * conv_width) < 1]
    return out + ([f"FC ({hidden} x {trunk.width:g})"] if round(hidden * trunk.width) < 1 else [])


def preset_shape(size: str, games: Sequence[str]) -> tuple[TrunkShape, float]:
    """The (shape, conv_width) that `size` picks for these games (`<suite>/<Game>` names): PRESET_SHAPES,
    else the teacher's uniform shape with conv channels following the width."""
    suite = games[0].split("/")[0] if games else ""
    return PRESET_SHAPES.get((suite, size), ("uniform", 0.0))


def parameter_count(trunk: TrunkSpec, num_actions: Sequence[int]) -> int:
    """Parameters of MultiHeadNet(trunk, heads of `num_actions`), computed without building it.

    Sum over convs of out * (in * k^2 + 1), over FC layers of out * (in + 1), and over heads of
    |A_g| * (hidden + 1).
    """
    convs, hidden = trunk.layer_sizes()
    total, channels, size = 0, trunk.in_channels, trunk.in_size
    for out, kernel, stride in convs:
        total += out * (channels * kernel * kernel + 1)
        channels, size = out, (size - kernel) // stride + 1
    total += hidden * (channels * size * size + 1) + trunk.extra_fc * hidden * (hidden + 1)
    return total + sum(n * (hidden + 1) for n in num_actions)


def width_for_parameters(trunk: TrunkSpec, num_actions: Sequence[int], target: float) -> float:
    """The smallest width w (rounded up to WIDTH_DECIMALS) with parameter_count(trunk at w) >= target.

    The count grows monotonically with width, step-wise since layer sizes are rounded, so bisect on
    it over WIDTH_RANGE; rounding up keeps the target reached.
    """
    lo, hi = WIDTH_RANGE
    for _ in range(50):  # 16 / 2^50: far below the rounding
        mid = (lo + hi) / 2
        if parameter_count(replace(trunk, width=mid), num_actions) < target:
            lo = mid
        else:
            hi = mid
    scale = 10 ** WIDTH_DECIMALS
    return math.ceil(hi * scale) / scale


class Size(NamedTuple):
    """Parameter counts of a sized network beside its teachers'."""
    parameters: int  # the whole network, every head
    one_head: int  # trunk and one head: what compares with one single-game teacher
    teachers: dict[str, int]  # each game's teacher network

    @property
    def fraction_of_teacher(self) -> float:
        return self.one_head / next(iter(self.teachers.values()))

    @property
    def fraction_of_mean_teacher(self) -> float:
        return self.parameters / float(np.mean(list(self.teachers.values())))

    def counts(self, name: str) -> dict:
        """The counts as cards and summaries hold them, the network's under `name`."""
        return {name: self.parameters, f"{name}_one_head": self.one_head,
                "teacher": next(iter(self.teachers.values())), "teachers": dict(self.teachers),
                "fraction_of_teacher": self.fraction_of_teacher,
                "fraction_of_mean_teacher": self.fraction_of_mean_teacher}


def sized_network(size: SizePreset, games: Sequence[GameSpec], width: float = 1.0, extra_fc: int = 0,
                  shape: TrunkShape = "uniform", conv_width: float = 0.0) -> tuple[NetworkSpec, Size]:
    """One head per game on a trunk sized by the preset (`width`, `extra_fc`: for `custom` only;
    `shape`, `conv_width`: for every preset).

    The trunk takes the largest channel count of the games (MinAtar: 4-10, see `pad_channels`).
    Fractions are of the first game's teacher, one head each; `multitask` is of all heads against
    the mean teacher.
    """
    teacher_specs = [teacher_network_spec(g) for g in games]
    teachers = {g.name: parameter_count(s.trunk, s.num_actions) for g, s in zip(games, teacher_specs)}
    actions = tuple(g.num_actions for g in games)
    kind = teacher_specs[0].trunk.kind
    if shape == "strided" and kind != "minatar":
        raise UserError("trunk shape 'strided' is for MinAtar networks (Atari: uniform or flat)")
    if shape == "flat" and kind == "minatar":
        raise UserError("trunk shape 'flat' is for Atari networks (MinAtar's one conv: uniform or strided)")
    base = replace(teacher_specs[0].trunk, in_channels=max(g.obs_shape[0] for g in games), shape=shape,
                   conv_width=conv_width)
    if size in SIZE_FRACTIONS:
        fraction, teacher = SIZE_FRACTIONS[size], teacher_specs[0]
        # the teacher's own architecture, unless a conv_width other than the teacher's asks for a search
        width = 1.0 if fraction == 1.0 and shape == "uniform" and conv_width in (0.0, 1.0) else width_for_parameters(
            base, teacher.num_actions, fraction * teachers[games[0].name])  # the trunk built: its channels padded
        trunk = replace(base, width=width)
    elif size == "multitask":
        trunk = replace(base, extra_fc=MULTITASK_EXTRA_FC)
        target = MULTITASK_FACTOR * float(np.mean(list(teachers.values())))
        trunk = replace(trunk, width=width_for_parameters(trunk, actions, target))
    else:
        trunk = replace(base, width=width, extra_fc=extra_fc)
    empty = empty_layers(trunk)
    if empty:
        raise UserError(f"size {size} with width {trunk.width:g} and conv_width {trunk.conv_width:g} leaves "
                        f"{', '.join(empty)} with no units; use a larger width or conv_width")
    spec = NetworkSpec(trunk, tuple(g.name for g in games), actions)
    return spec, Size(parameter_count(trunk, actions), parameter_count(trunk, actions[:1]), teachers)
