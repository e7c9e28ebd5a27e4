"""Episodes packed for writing: the arrays a file stores, their rows numbered after a writer's contents.

`Packed` is what crosses from the recorder's episodes to a writer (and, for a BackgroundWriter,
down the pipe to its child); `WriterCounts` is the part both writers share: the sizes in their
root attributes and the packing of new episodes after them.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np

from multitask.data.schema import EPISODE_FIELDS, STEP_FIELDS, Episode


class Packed(NamedTuple):
    """Episodes stacked for writing: per-step arrays, per-episode arrays, frames (global row numbers).

    On its way to a BackgroundWriter's child, `frames` is the list of the episodes' frame arrays,
    received there straight into one array (`background._send_packed`): concatenating a MinAtar flush's 31 MB
    of frames cost its caller 65-130 ms, mostly first-touching new memory (measured in builds;
    12-50 ms in isolation).
    """

    steps: dict[str, np.ndarray]
    episodes: dict[str, np.ndarray]
    frames: np.ndarray | list[np.ndarray]


def frame_count(packed: Packed) -> int:
    """Frames in `packed`, joined or still one array per episode."""
    return len(packed.frames) if isinstance(packed.frames, np.ndarray) else sum(len(f) for f in packed.frames)


def flat_arrays(packed: Packed) -> dict[str, np.ndarray]:
    """Dataset path -> array."""
    return {**{f"steps/{k}": v for k, v in packed.steps.items()},
            **{f"episodes/{k}": v for k, v in packed.episodes.items()}, "frames": packed.frames}


def pack_episodes(episodes: Sequence[Episode], step0: int, episode0: int, frame0: int, stack: int,
                  join_frames: bool = True) -> Packed:
    """Stack episodes into per-step, per-episode and frame arrays with global row indices.

    Vectorised over episodes (a Python loop per episode was 0.3 s of a 3 s MinAtar build; measured).
    """
    if not episodes:
        return Packed({k: np.zeros((0,), dtype) for k, (dtype, _, _) in STEP_FIELDS.items()},
                      {k: np.zeros((0,), dtype) for k, (dtype, _, _) in EPISODE_FIELDS.items()},
                      np.zeros((0,), np.uint8) if join_frames else [])
    length = np.array([ep.length for ep in episodes], dtype=np.int64)
    num_frames = np.array([len(ep.frames) for ep in episodes], dtype=np.int64)
    first_step = step0 + np.cumsum(length) - length
    first_frame = frame0 + np.cumsum(num_frames) - num_frames + stack - 1  # row of f(s_0): after the pads
    last = np.cumsum(length) - 1  # each episode's last row in this batch
    steps = {name: np.concatenate([getattr(ep, name) for ep in episodes]).astype(STEP_FIELDS[name][0], copy=False)
             for name in ("teacher_outputs", "action", "reward", "terminated", "truncated", "life_lost")}
    steps["frame_index"] = np.repeat(first_frame - first_step, length) + np.arange(step0, step0 + int(length.sum()))
    steps["episode"] = np.repeat(np.arange(episode0, episode0 + len(episodes), dtype=np.int32), length)
    values = {"first_step": first_step, "length": length, "first_frame": first_frame,
              "return": np.add.reduceat(steps["reward"].astype(np.float64), last - length + 1),
              "terminated": steps["terminated"][last], "truncated": steps["truncated"][last],
              "complete": [ep.complete for ep in episodes], "policy": [ep.policy for ep in episodes],
              "epsilon": [ep.epsilon for ep in episodes], "env_seed": [ep.env_seed for ep in episodes],
              "env_episode": [ep.env_episode for ep in episodes]}
    ep_arrays = {k: np.asarray(values[k], dtype=EPISODE_FIELDS[k][0]) for k in EPISODE_FIELDS}
    step_arrays = {k: steps[k] for k in STEP_FIELDS}
    frames = [ep.frames for ep in episodes]
    return Packed(step_arrays, ep_arrays, np.concatenate(frames) if join_frames else frames)


class WriterCounts:
    """Sizes from a writer's root attributes (BackgroundWriter: steps handed over to its child), and
    the packing of episodes that numbers their rows after them."""

    attrs: dict[str, Any]

    @property
    def num_steps(self) -> int:
        return int(self.attrs["num_steps"])

    @property
    def num_episodes(self) -> int:
        return int(self.attrs["num_episodes"])

    def pack(self, episodes: Sequence[Episode], join_frames: bool = True) -> Packed:
        """The arrays `write` takes, with rows numbered after this writer's current contents."""
        return pack_episodes(episodes, self.num_steps, self.num_episodes, int(self.attrs["num_frames"]),
                             int(self.attrs["stack"]), join_frames)

    def _count(self, packed: Packed) -> None:
        self.attrs["num_steps"] = self.num_steps + len(packed.steps["action"])
        self.attrs["num_episodes"] = self.num_episodes + len(packed.episodes["length"])
        self.attrs["num_frames"] = int(self.attrs["num_frames"]) + frame_count(packed)
