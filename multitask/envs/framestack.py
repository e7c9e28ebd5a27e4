"""Frame-once storage of stacked observations, shared by the replay memory and the datasets.

An episode is stored as a run of frames: the `stack - 1` older frames of its first observation
(the "pad" frames, whatever the env filled the stack with at reset), then one new frame per
observation s_0, s_1, ..., s_T. Observation s_t is then the `stack` consecutive frames ending at
s_t's own frame, with no special case at episode starts:

    frames:  [pad_0 .. pad_{k-2}] [f(s_0)] [f(s_1)] ... [f(s_T)]
    s_t   =  frames[first + t - k + 1 : first + t + 1]   (first = index of f(s_0))

This holds as long as the env's stack is a sliding window within an episode, which the tests
check bit for bit on real Atari and MinAtar episodes.
"""

from __future__ import annotations

import numpy as np


def split_frames(obs: np.ndarray, frame_channels: int) -> np.ndarray:
    """(..., k*C, H, W) stacked observation(s) -> (..., k, C, H, W) frames, oldest first."""
    *lead, kc, h, w = obs.shape
    return obs.reshape(*lead, kc // frame_channels, frame_channels, h, w)


def newest_frame(obs: np.ndarray, frame_channels: int) -> np.ndarray:
    """(N, k*C, H, W) -> (N, C, H, W): the frame an observation adds to the run."""
    return obs[:, obs.shape[1] - frame_channels:]


def stack_indices(frame_index: np.ndarray, stack: int) -> np.ndarray:
    """Indices of the frames making up observation(s) whose own frame is at `frame_index`.

    (B,) -> (B, stack), oldest first.
    """
    return np.asarray(frame_index)[..., None] + np.arange(1 - stack, 1)


def join_frames(frames: np.ndarray) -> np.ndarray:
    """(..., k, C, H, W) frames, oldest first -> (..., k*C, H, W) stacked observation(s); the inverse
    of `split_frames`."""
    *lead, k, c, h, w = frames.shape
    return frames.reshape(*lead, k * c, h, w)
