"""Networks: trunks (Nature CNN, MinAtar CNN, width-scaled), per-game linear heads, MultiHeadNet.

Every agent in the project is a `MultiHeadNet`: a teacher is one with a single head, a student or
a multi-task DQN one head per game. The trunk is shared; the game selects the head, it is never an
input (Rusu et al. 2016). A `NetworkSpec` (plain data) rebuilds the exact module from a checkpoint.

Observations enter as uint8 and are scaled inside `forward` (1/255 for Atari pixels, 1 for MinAtar's
0/1 channels), so replay memories and datasets stay uint8 end to end. Games whose observations
have fewer channels than the trunk expects are zero-padded on the channel axis (MinAtar games have
4-10 channels; a shared trunk takes the maximum).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from multitask.envs import GameSpec
from multitask.errors import UserError

TrunkKind = Literal["nature", "minatar"]

# (out_channels, kernel, stride) per conv and the hidden FC size, before width scaling.
NATURE_CONVS = ((32, 8, 4), (64, 4, 2), (64, 3, 1))  # Mnih et al. 2015
NATURE_HIDDEN = 512  # Mnih et al. 2015
MINATAR_CONVS = ((16, 3, 1),)  # Young & Tian 2019 (MinAtar paper): conv 16 3x3, FC 128
MINATAR_HIDDEN = 128
# The `strided` shape appends this conv: 8x8x16 features become 4x4x16 (a 2x2 kernel at stride 2
# covers every cell; 3x3 at stride 2 would drop the last row and column), so the FC input shrinks from
# 1,024 to 256 and a small network's parameters go to features and FC units, not to one wide FC
# input (paper A's small students kept conv widths near the teacher's and shrank the FC).
STRIDED_CONV = (16, 2, 2)
TrunkShape = Literal["uniform", "strided", "flat"]


def shape_tag(shape: TrunkShape, conv_width: float) -> str:
    """How run names and result tables write a trunk shape: `uniform`, `strided`, `strided-conv1`."""
    return shape + (f"-conv{conv_width:g}" if conv_width else "")


@dataclass(frozen=True)
class TrunkSpec:
    kind: TrunkKind
    in_channels: int
    in_size: int  # square input side: 84 (Atari) or 10 (MinAtar)
    width: float = 1.0  # multiplies every FC's units, and every conv's channels unless conv_width is set
    extra_fc: int = 0  # extra hidden FC layers after the first (paper A's multi-task student: 1)
    shape: TrunkShape = "uniform"  # strided: STRIDED_CONV appended to the convs; flat: every conv as wide as the first
    conv_width: float = 0.0  # multiplies every conv's channels; 0: follow `width`

    def layer_sizes(self) -> tuple[tuple[tuple[int, int, int], ...], int]:
        convs, hidden = (NATURE_CONVS, NATURE_HIDDEN) if self.kind == "nature" else (MINATAR_CONVS, MINATAR_HIDDEN)
        if self.shape == "strided":
            convs = convs + (STRIDED_CONV,)
        elif self.shape == "flat":  # paper A's small Atari students: conv 16/16/16 (Nature's 32 at conv_width 0.5)
            convs = tuple((convs[0][0], k, s) for _, k, s in convs)
        conv_width = self.conv_width or self.width
        scaled = tuple((max(1, round(c * conv_width)), k, s) for c, k, s in convs)
        return scaled, max(1, round(hidden * self.width))


@dataclass(frozen=True)
class NetworkSpec:
    trunk: TrunkSpec
    games: tuple[str, ...]
    num_actions: tuple[int, ...]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["games"], d["num_actions"] = list(self.games), list(self.num_actions)
        return d

    @staticmethod
    def from_dict(d: dict) -> "NetworkSpec":
        return NetworkSpec(TrunkSpec(**d["trunk"]), tuple(d["games"]), tuple(d["num_actions"]))


def pad_channels(obs: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, c, H, W) -> (B, channels, H, W), zero channels appended: games of a suite with fewer
    channels than the shared trunk takes (MinAtar: 4-10) enter it this way."""
    missing = channels - obs.shape[1]
    return F.pad(obs, (0, 0, 0, 0, 0, missing)) if missing > 0 else obs


class Trunk(nn.Module):
    """Conv stack + hidden FC layers; maps uint8 (B, C, H, W) to features (B, hidden)."""

    def __init__(self, spec: TrunkSpec):
        super().__init__()
        self.spec = spec
        convs, hidden = spec.layer_sizes()
        layers: list[nn.Module] = []
        channels, size = spec.in_channels, spec.in_size
        for out, kernel, stride in convs:
            layers += [nn.Conv2d(channels, out, kernel, stride), nn.ReLU()]
            channels, size = out, (size - kernel) // stride + 1
        self.convs = nn.Sequential(*layers)
        fcs: list[nn.Module] = [nn.Linear(channels * size * size, hidden), nn.ReLU()]
        for _ in range(spec.extra_fc):
            fcs += [nn.Linear(hidden, hidden), nn.ReLU()]
        self.fcs = nn.Sequential(*fcs)
        self.out_features = hidden
        self.scale = 1.0 / 255.0 if spec.kind == "nature" else 1.0

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = pad_channels(obs.float() * self.scale, self.spec.in_channels)  # (B, C, H, W)
        x = rearrange(self.convs(x), "b c h w -> b (c h w)")
        return self.fcs(x)  # (B, hidden)


class MultiHeadNet(nn.Module):
    """Shared trunk + one linear head per game; `forward(obs, game)` selects the head."""

    def __init__(self, spec: NetworkSpec):
        super().__init__()
        if len(spec.games) != len(spec.num_actions):
            raise ValueError("one action count per game")
        self.spec = spec
        self.trunk = Trunk(spec.trunk)
        self.heads = nn.ModuleList(nn.Linear(self.trunk.out_features, n) for n in spec.num_actions)
        self.game_index = {g: i for i, g in enumerate(spec.games)}

    @property
    def games(self) -> tuple[str, ...]:
        return self.spec.games

    def head_index(self, game: str) -> int:
        try:
            return self.game_index[game]
        except KeyError:
            raise UserError(f"this network has no head for {game}; its games are "
                            f"{', '.join(self.spec.games)}") from None

    def forward(self, obs: torch.Tensor, game: str | int = 0,
                groups: Sequence[tuple[int, slice]] | None = None) -> torch.Tensor | list[torch.Tensor]:
        """Outputs (B, |A_game|) for a batch that is all one game; or, given `groups` (head index,
        rows) of a batch grouped by game, one trunk pass and a list of each group's head outputs."""
        features = self.trunk(obs)
        if groups is not None:
            return [self.heads[h](features[rows]) for h, rows in groups]
        idx = game if isinstance(game, int) else self.head_index(game)
        return self.heads[idx](features)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def teacher_network_spec(game: GameSpec, width: float = 1.0) -> NetworkSpec:
    """The single-game Q-network for `game`: Nature CNN for Atari, the MinAtar CNN for MinAtar."""
    kind: TrunkKind = "nature" if game.suite == "atari" else "minatar"
    trunk = TrunkSpec(kind=kind, in_channels=game.obs_shape[0], in_size=game.obs_shape[1], width=width)
    return NetworkSpec(trunk, (game.name,), (game.num_actions,))
