"""Atari through ale-py's native vector env, with the standard DQN preprocessing.

Settings follow Mnih et al. 2015 (Nature DQN) as used by CleanRL and Stable-Baselines3's
AtariWrapper: no sticky actions, up to 30 no-op starts, frame skip 4 with max-pool over the last
two frames, FIRE on reset where the game has it, 84x84 grayscale, 4 stacked frames, 108,000-frame
(30 minute) episode cap. Rewards stay raw and episodes are whole games here; the DQN learner clips
rewards to [-1, 1] and ends its *training* episodes at a lost life (from `Step.life_lost`).
ale-py's vector env runs ~2.4x faster than gymnasium wrappers on 2 cores (ecosystem.md).
"""

from __future__ import annotations

import functools

import numpy as np

from multitask.envs import GameSpec, Step

NOOP_MAX = 30  # Mnih et al. 2015: up to 30 no-op actions at the start of every episode
FRAME_SKIP = 4  # Mnih et al. 2015
MAX_EPISODE_FRAMES = 108_000  # 30 minutes at 60 Hz (Machado et al. 2018; policy distillation paper)


def _camel(rom_id: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in rom_id.split("_"))


# ROMs ale-py ships but cannot play as single-player games: "These roms don't have a single-player
# ROM attached (do have a multi-player mode)" (ale_py/registration.py, which registers no ALE/*-v5
# env for them; Arcade-Learning-Environment issue #537, open). Measured with ale-py 0.12.1: each
# of these four fails ALEInterface.loadROM with "Attempt to wrap ROM ... failed" and the C++
# library exits the process (status 1, no Python exception to catch); the other 104 ROMs load.
UNPLAYABLE_ROMS = frozenset({"combat", "joust", "maze_craze", "warlords"})
# get_game names these in its refusal instead of suggesting look-alike names
UNPLAYABLE = {_camel(r): "ale-py ships its ROM but cannot load it (a multi-player game; ALE issue #537)"
              for r in sorted(UNPLAYABLE_ROMS)}


@functools.cache
def _rom_ids() -> dict[str, str]:
    from ale_py import roms
    return {_camel(r): r for r in roms.get_all_rom_ids() if r not in UNPLAYABLE_ROMS}


class _Games:
    """Lazy list of game names (importing ale-py only when asked)."""

    def __contains__(self, game: str) -> bool:
        return game in _rom_ids()

    def __iter__(self):
        return iter(sorted(_rom_ids()))


GAMES = _Games()


@functools.cache
def game_spec(game: str) -> GameSpec:
    import ale_py

    rom = _rom_ids()[game]
    ale_py.ALEInterface.setLoggerMode(ale_py.LoggerMode.Error)  # no banner on every start
    ale = ale_py.ALEInterface()
    ale.loadROM(ale_py.roms.get_rom_path(rom))
    meanings = tuple(a.name for a in ale.getMinimalActionSet())
    preprocessing = {
        "emulator": f"ale_py {ale_py.__version__} AtariVectorEnv",
        "rom": rom,
        "repeat_action_probability": 0.0,
        "full_action_space": False,
        "noop_max": NOOP_MAX,
        "frame_skip": FRAME_SKIP,
        "maxpool_last_two_frames": True,
        "fire_reset": True,
        "resize": [84, 84],
        "grayscale": True,
        "frame_stack": 4,
        "max_episode_frames": MAX_EPISODE_FRAMES,
        "episode": "whole game (all lives); learners treat a lost life as terminal",
        "reward": "raw; learners clip to [-1, 1]",
        "autoreset": "same step",
    }
    return GameSpec(
        name=f"atari/{game}", suite="atari", game=game,
        env_id=f"ale_py.vector_env.AtariVectorEnv(game={rom!r})",
        frame_shape=(1, 84, 84), stack=4, action_meanings=meanings,
        max_episode_steps=MAX_EPISODE_FRAMES // FRAME_SKIP, preprocessing=preprocessing,
    )


class VecEnv:
    """`num_envs` Atari games stepped in lock-step by ale-py's threaded C++ vector env."""

    def __init__(self, spec: GameSpec, num_envs: int, num_threads: int = 0):
        from ale_py.vector_env import AtariVectorEnv

        self.spec, self.num_envs = spec, num_envs
        pre = spec.preprocessing
        self._env = AtariVectorEnv(
            pre["rom"], num_envs, num_threads=num_threads,
            autoreset_mode="SameStep", max_num_frames_per_episode=MAX_EPISODE_FRAMES,
            repeat_action_probability=0.0, full_action_space=False,
            img_height=84, img_width=84, grayscale=True, stack_num=4,
            frameskip=FRAME_SKIP, maxpool=True, noop_max=NOOP_MAX,
            episodic_life=False, life_loss_info=False, reward_clipping=False, use_fire_reset=True,
        )
        self._lives = np.zeros(num_envs, dtype=np.int32)

    def reset(self, seed: int) -> np.ndarray:
        obs, info = self._env.reset(seed=int(seed))
        self._lives = info["lives"].copy()
        return obs

    def step(self, actions: np.ndarray) -> Step:
        obs, reward, terminated, truncated, info = self._env.step(np.asarray(actions, dtype=np.int64))
        lives = info["lives"]
        done = terminated | truncated
        # At game over the env has already reset, so `lives` is the new game's count.
        life_lost = terminated | ((lives < self._lives) & ~done)
        self._lives = lives.copy()
        next_obs = obs
        if done.any():
            next_obs = obs.copy()
            next_obs[done] = info["final_obs"][done]
        return Step(obs, next_obs, reward.astype(np.float32), terminated, truncated, life_lost)

    def close(self) -> None:
        self._env.close()
