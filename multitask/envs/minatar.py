"""MinAtar (Young & Tian 2019): five 10x10 miniature Atari games, vectorised in-process.

Games use their minimal action sets (gymnasium id `MinAtar/<Game>-v1`) and MinAtar's own
defaults: sticky actions with probability 0.1 and difficulty ramping (the MinAtar paper's
setting). Observations are the game's boolean channels as uint8 (C, 10, 10), one frame per
observation (the games carry motion in "trail" channels, so MinAtar agents do not stack frames).
MinAtar has no episode cap of its own except Freeway's 2,500-frame clock; we cut episodes at
MAX_EPISODE_STEPS so that evaluation always ends.
"""

from __future__ import annotations

import functools

import numpy as np

from multitask.envs import GameSpec, Step

GAMES = {  # our name -> MinAtar module name
    "Asterix": "asterix",
    "Breakout": "breakout",
    "Freeway": "freeway",
    "Seaquest": "seaquest",
    "SpaceInvaders": "space_invaders",
}
STICKY_ACTION_PROB = 0.1  # MinAtar default (Young & Tian 2019, following Machado et al. 2018)
MAX_EPISODE_STEPS = 10_000  # our cap: well beyond DQN-level episodes (a few hundred to ~2,500 steps)
_ACTION_NAMES = ("NOOP", "LEFT", "UP", "RIGHT", "DOWN", "FIRE")  # minatar's action_map order


@functools.cache
def game_spec(game: str) -> GameSpec:
    from importlib.metadata import version

    from minatar import Environment

    env = Environment(GAMES[game], sticky_action_prob=STICKY_ACTION_PROB)
    h, w, c = env.state_shape()
    preprocessing = {
        "emulator": f"minatar {version('minatar')} Environment",
        "module": GAMES[game],
        "sticky_action_prob": STICKY_ACTION_PROB,
        "difficulty_ramping": True,
        "minimal_action_set": [int(a) for a in env.minimal_action_set()],
        "observation": "boolean channels as uint8, (C, 10, 10), no frame stacking",
        "max_episode_steps": MAX_EPISODE_STEPS,
        "reward": "raw",
        "autoreset": "same step",
    }
    return GameSpec(
        name=f"minatar/{game}", suite="minatar", game=game, env_id=f"MinAtar/{game}-v1",
        frame_shape=(c, h, w), stack=1,
        action_meanings=tuple(_ACTION_NAMES[a] for a in env.minimal_action_set()),
        max_episode_steps=MAX_EPISODE_STEPS, preprocessing=preprocessing,
    )


class VecEnv:
    """`num_envs` MinAtar games stepped one after another (each step costs ~10-60 us)."""

    def __init__(self, spec: GameSpec, num_envs: int, num_threads: int = 0):
        from minatar import Environment

        self.spec, self.num_envs = spec, num_envs
        self._envs = [Environment(GAMES[spec.game], sticky_action_prob=STICKY_ACTION_PROB)
                      for _ in range(num_envs)]
        self._action_set = np.asarray(spec.preprocessing["minimal_action_set"])
        self._t = np.zeros(num_envs, dtype=np.int64)

    def _observe(self, out: np.ndarray, i: int) -> None:
        out[i] = self._envs[i].state().transpose(2, 0, 1)

    def reset(self, seed: int) -> np.ndarray:
        obs = np.empty((self.num_envs, *self.spec.obs_shape), dtype=np.uint8)
        for i, env in enumerate(self._envs):
            env.seed(int(seed) + i)
            env.reset()
            self._observe(obs, i)
        self._t[:] = 0
        return obs

    def step(self, actions: np.ndarray) -> Step:
        n = self.num_envs
        obs = np.empty((n, *self.spec.obs_shape), dtype=np.uint8)
        reward = np.zeros(n, dtype=np.float32)
        terminated = np.zeros(n, dtype=bool)
        self._t += 1
        truncated = self._t >= MAX_EPISODE_STEPS
        for i, (env, a) in enumerate(zip(self._envs, self._action_set[np.asarray(actions)])):
            reward[i], terminated[i] = env.act(int(a))
            self._observe(obs, i)
        truncated &= ~terminated
        done = terminated | truncated
        next_obs = obs
        if done.any():
            next_obs = obs.copy()
            for i in np.flatnonzero(done):
                self._envs[i].reset()
                self._observe(obs, i)
            self._t[done] = 0
        return Step(obs, next_obs, reward, terminated, truncated, terminated.copy())

    def close(self) -> None:
        pass
