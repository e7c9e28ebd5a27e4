"""DQN replay memory that stores every frame once (per-env ring buffers of frames).

Each env of the vector env writes its own ring, in the frame-once layout of `framestack`: an
episode is its pad frames, then one frame per observation. A slot holds the frame of observation
s_t and, once the agent has acted, the transition (a_t, r_t, terminal_t) to s_{t+1} in the next
slot. Pad slots and the final observation of an episode start no transition. A 1M-transition Atari
memory is therefore ~7 GB of frames instead of ~28 GB of stacked observations (Mnih et al. 2015
used the same trick).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from multitask.agents.networks import pad_channels
from multitask.envs.framestack import newest_frame, split_frames


class ReplayBatch(NamedTuple):
    obs: torch.Tensor  # (B, *obs_shape) uint8
    action: torch.Tensor  # (B,) int64
    reward: torch.Tensor  # (B,) float32, raw game reward (the learner clips)
    terminal: torch.Tensor  # (B,) float32: 1 where the learner must not bootstrap
    next_obs: torch.Tensor  # (B, *obs_shape) uint8

    def to(self, device: torch.device) -> "ReplayBatch":
        """The batch on `device`, frames still uint8 (a quarter of float32's transfer)."""
        return ReplayBatch(*(t.to(device, non_blocking=True) for t in self))


class WindowBatch(NamedTuple):
    """A sampled batch as it leaves the replay: each transition's frames once, s_t's k frames and
    s_{t+1}'s newest, (B, k+1, C, H, W) uint8. `to(device)` moves (k+1)/2k of the bytes two
    stacked observations would take (5/8 for Atari's k = 4) and cuts s_t and s_{t+1} out of it
    there, as views: the stacking happens on the device."""
    window: torch.Tensor  # (B, k+1, C, H, W) uint8, oldest frame first
    action: torch.Tensor
    reward: torch.Tensor
    terminal: torch.Tensor

    @property
    def obs(self) -> torch.Tensor:
        return self.window[:, :-1].flatten(1, 2)  # (B, k*C, H, W): the frame-stack layout of join_frames

    @property
    def next_obs(self) -> torch.Tensor:
        return self.window[:, 1:].flatten(1, 2)

    def to(self, device: torch.device) -> ReplayBatch:
        """The batch on `device` as a ReplayBatch, its observations stacked there."""
        moved = WindowBatch(*(t.to(device, non_blocking=True) for t in self))
        return ReplayBatch(moved.obs, moved.action, moved.reward, moved.terminal, moved.next_obs)


def rows_per_game(batch_size: int, games: int) -> list[int]:
    """A mixed batch's rows of each game: B // G each, the first B mod G games one more (17, 2 -> 9, 8)."""
    base, extra = divmod(batch_size, games)
    return [base + (1 if g < extra else 0) for g in range(games)]


def join_batches(batches: list[ReplayBatch | WindowBatch], channels: int) -> tuple[ReplayBatch, list[tuple[int, slice]]]:
    """One batch of every game's rows in order, observations zero-padded to `channels` (games of a
    suite differ in channels: MinAtar 4-10); and (game index, rows) of each group."""
    groups, start = [], 0
    for g, b in enumerate(batches):
        groups.append((g, slice(start, start + len(b.action))))
        start += len(b.action)
    joined = ReplayBatch(
        obs=torch.cat([pad_channels(b.obs, channels) for b in batches]),
        action=torch.cat([b.action for b in batches]), reward=torch.cat([b.reward for b in batches]),
        terminal=torch.cat([b.terminal for b in batches]),
        next_obs=torch.cat([pad_channels(b.next_obs, channels) for b in batches]))
    return joined, groups


class ReplayMemory:
    def __init__(self, capacity: int, num_envs: int, frame_shape: tuple[int, int, int], stack: int,
                 seed: int = 0):
        per_env = capacity // num_envs
        if per_env < 4 * stack:
            raise ValueError(f"replay capacity {capacity} is too small for {num_envs} envs")
        self.num_envs, self.cap, self.stack = num_envs, per_env, stack
        self.frame_channels = frame_shape[0]
        self.frames = np.zeros((num_envs, per_env, *frame_shape), dtype=np.uint8)
        self.action = np.zeros((num_envs, per_env), dtype=np.int64)
        self.reward = np.zeros((num_envs, per_env), dtype=np.float32)
        self.terminal = np.zeros((num_envs, per_env), dtype=bool)
        self.valid = np.zeros((num_envs, per_env), dtype=bool)  # slot starts a stored transition
        self.head = np.zeros(num_envs, dtype=np.int64)  # next slot to write, per env
        self.count = np.zeros(num_envs, dtype=np.int64)  # live slots, per env
        self.rng = np.random.default_rng(seed)
        self._envs = np.arange(num_envs)

    def __len__(self) -> int:
        """Stored transitions (approximately: pads and final observations are not transitions)."""
        return int(self.valid.sum())

    def _write(self, envs: np.ndarray, frames: np.ndarray) -> None:
        slots = self.head[envs]
        self.frames[envs, slots] = frames
        self.valid[envs, slots] = False
        self.head[envs] = (slots + 1) % self.cap
        self.count[envs] = np.minimum(self.count[envs] + 1, self.cap)

    def begin_episodes(self, obs: np.ndarray, envs: np.ndarray | None = None) -> None:
        """Start new episodes in `envs` (all by default) from their first observations."""
        envs = self._envs if envs is None else envs
        for frame in np.moveaxis(split_frames(obs, self.frame_channels), 1, 0):  # pads, then s_0
            self._write(envs, frame)

    def add(self, action: np.ndarray, reward: np.ndarray, terminal: np.ndarray,
            next_obs: np.ndarray, done: np.ndarray, obs: np.ndarray) -> None:
        """Record one vector step taken from the last written observations.

        `terminal` is the learner's no-bootstrap flag (game over, or a lost life for Atari);
        `next_obs` the true successors; where `done`, `obs` holds the new episodes' first
        observations.
        """
        last = (self.head - 1) % self.cap
        self.action[self._envs, last] = action
        self.reward[self._envs, last] = reward
        self.terminal[self._envs, last] = terminal
        self.valid[self._envs, last] = True
        self._write(self._envs, newest_frame(next_obs, self.frame_channels))
        if done.any():
            self.begin_episodes(obs[done], np.flatnonzero(done))

    def sample(self, batch_size: int) -> WindowBatch:
        """Uniform over stored transitions whose frames are all still in memory; each transition's
        k+1 frames gathered once (`WindowBatch`)."""
        k = self.stack
        env_out = np.empty(batch_size, dtype=np.int64)
        slot_out = np.empty(batch_size, dtype=np.int64)
        filled = 0
        while filled < batch_size:
            n = batch_size - filled
            env = self.rng.integers(0, self.num_envs, 2 * n)
            live = self.count[env]
            # Slot must have k-1 live slots before it and a written successor after it.
            hi = np.maximum(live - 1, k)
            rel = (self.rng.random(2 * n) * (hi - (k - 1))).astype(np.int64) + (k - 1)
            slot = (self.head[env] - live + rel) % self.cap
            ok = self.valid[env, slot] & (rel <= live - 2)
            take = np.flatnonzero(ok)[:n]
            env_out[filled:filled + len(take)] = env[take]
            slot_out[filled:filled + len(take)] = slot[take]
            filled += len(take)
        offsets = np.arange(1 - k, 2)
        idx = (slot_out[:, None] + offsets) % self.cap  # (B, k+1): frames of s_t, then s_{t+1}'s newest
        return WindowBatch(
            window=torch.from_numpy(self.frames[env_out[:, None], idx]),
            action=torch.from_numpy(self.action[env_out, slot_out]),
            reward=torch.from_numpy(self.reward[env_out, slot_out]),
            terminal=torch.from_numpy(self.terminal[env_out, slot_out].astype(np.float32)),
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        names = ("frames", "action", "reward", "terminal", "valid", "head", "count")
        return {n: torch.from_numpy(getattr(self, n)) for n in names}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, value in state.items():
            target = getattr(self, name)
            if tuple(value.shape) != target.shape:
                raise ValueError(f"replay {name} has shape {tuple(value.shape)}, expected {target.shape}")
            target[...] = value.numpy()
