"""The game registry: every game is `<suite>/<Game>`, every suite gives vectorised envs.

One env per game serves training, dataset recording and evaluation alike, so all three see the
same observations. The env reports *raw* rewards and whole games; what training does differently
(clip rewards, treat a lost life as terminal) is done by the learner from `Step.life_lost`, not by
a second env configuration.

A stacked observation is `stack` frames of shape `frame_shape` (C, H, W) concatenated along C:
Atari is 4 x (1, 84, 84), MinAtar is 1 x (C_game, 10, 10). Storage keeps each frame once.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import numpy as np

from multitask.errors import UserError

SUITES = ("atari", "minatar")


@dataclass(frozen=True)
class GameSpec:
    """What every consumer needs to know about a game, independent of the emulator."""

    name: str  # "<suite>/<Game>", e.g. "atari/Pong"
    suite: str
    game: str
    env_id: str  # the emulator's own id, for provenance (e.g. "ALE/Pong-v5")
    frame_shape: tuple[int, int, int]  # (C, H, W) of one stored frame
    stack: int  # frames per observation
    action_meanings: tuple[str, ...]  # the legal (minimal) action set, in head order
    max_episode_steps: int  # agent steps before truncation (Atari: 108,000 frames / frame skip 4)
    preprocessing: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def obs_shape(self) -> tuple[int, int, int]:
        c, h, w = self.frame_shape
        return (c * self.stack, h, w)

    @property
    def num_actions(self) -> int:
        return len(self.action_meanings)

    def describe(self) -> dict[str, Any]:
        """Everything about the env a checkpoint or dataset must carry (JSON-able)."""
        return {
            "name": self.name, "suite": self.suite, "game": self.game, "env_id": self.env_id,
            "frame_shape": list(self.frame_shape), "stack": self.stack,
            "obs_shape": list(self.obs_shape), "action_meanings": list(self.action_meanings),
            "max_episode_steps": self.max_episode_steps, "preprocessing": dict(self.preprocessing),
        }


class Step(NamedTuple):
    """One vector step. Where an env finished, it was reset in the same step (same-step autoreset)."""

    obs: np.ndarray  # (N, *obs_shape) uint8: what the agent acts on next (a new episode's first obs where done)
    next_obs: np.ndarray  # (N, *obs_shape) uint8: true successor of the previous obs (the final obs where done)
    reward: np.ndarray  # (N,) float32 raw game reward (never clipped here)
    terminated: np.ndarray  # (N,) bool: game over
    truncated: np.ndarray  # (N,) bool: episode cut at max_episode_steps
    life_lost: np.ndarray  # (N,) bool: a life was lost in this step (true at game over too)

    @property
    def done(self) -> np.ndarray:
        return self.terminated | self.truncated


class VectorEnv(Protocol):
    spec: GameSpec
    num_envs: int

    def reset(self, seed: int) -> np.ndarray:
        """Reset all envs, env i seeded with seed + i; returns (N, *obs_shape) uint8."""

    def step(self, actions: np.ndarray) -> Step:
        """Act with indices into the legal action set."""

    def close(self) -> None: ...


def _suite_module(suite: str):
    if suite == "atari":
        from multitask.envs import atari
        return atari
    if suite == "minatar":
        from multitask.envs import minatar
        return minatar
    raise KeyError(suite)


def known_games(suite: str | None = None) -> list[str]:
    suites = SUITES if suite is None else (suite,)
    return [f"{s}/{g}" for s in suites for g in _suite_module(s).GAMES]


def get_game(name: str) -> GameSpec:
    """The spec of `<suite>/<Game>`; an unknown name is a user error listing the known games."""
    suite, _, game = name.partition("/")
    if suite in SUITES and game in _suite_module(suite).GAMES:
        return _suite_module(suite).game_spec(game)
    unplayable = getattr(_suite_module(suite), "UNPLAYABLE", {}) if suite in SUITES else {}
    if game in unplayable:
        raise UserError(f"{name} cannot be played here: {unplayable[game]}; pick another game "
                        f"(`multitask games` lists them)")
    known = known_games()
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    # MinAtar's five are listed; Atari's ~100 would bury the sentence: `multitask games` has them
    raise UserError(f"unknown game '{name}'{hint}; games are named <suite>/<Game>: "
                    f"{', '.join(known_games('minatar'))}, or atari/<Game> for {len(known_games('atari'))} "
                    f"ALE games (`multitask games` lists them)")


def make_vector_env(game: GameSpec | str, num_envs: int, num_threads: int = 0) -> VectorEnv:
    """A vectorised env of `num_envs` copies of `game` (reset it before stepping)."""
    spec = get_game(game) if isinstance(game, str) else game
    return _suite_module(spec.suite).VecEnv(spec, num_envs, num_threads=num_threads)
