"""Checking a dataset: its structural invariants, and its teacher outputs against the teacher.

`verify_invariants` checks everything the schema promises (sizes, episode tiling, the frame-once
layout, flags, returns, finite outputs, frames that decode) and returns the problems found;
`check_teacher_outputs` recomputes the teacher on a random sample of steps. `multitask dataset
verify` runs both; the tests run them after every build and after every kill of a build.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from multitask.agents.checkpoints import Agent, check_agent_game
from multitask.data.reader import DatasetReader, UndecodableFrames
from multitask.data.schema import dataset_layout
from multitask.envs import get_game
from multitask.errors import UserError


def _layout_problems(reader: DatasetReader) -> list[str]:
    """Every dataset's dtype and row shape as the schema says (the root attributes give A and (C, H, W))."""
    problems = []
    arrays = {**{f"steps/{k}": v for k, v in reader.steps.items()},
              **{f"episodes/{k}": v for k, v in reader.episodes.items()}}
    for name, (dtype, row, _) in dataset_layout(reader.info.attrs).items():
        got_dtype, got_row = ((reader.frame_dtype, reader.frame_shape) if name == "frames"
                              else (arrays[name].dtype, arrays[name].shape[1:]))
        if np.dtype(got_dtype) != np.dtype(dtype) or tuple(got_row) != tuple(row):
            problems.append(f"/{name} is {np.dtype(got_dtype)} with rows of shape {tuple(got_row)}, the schema "
                            f"says {dtype} with rows of shape {tuple(row)}")
    return problems


def _game_problems(reader: DatasetReader) -> list[str]:
    """The root attributes that describe the game must be the game's own (its legal action set above all)."""
    attrs = reader.info.attrs
    try:
        game = get_game(reader.game)
    except UserError:
        return [f"the file's game {reader.game} is not a game this package knows"]
    problems = []
    if int(attrs["num_actions"]) != game.num_actions:
        problems.append(f"root attribute num_actions is {int(attrs['num_actions'])}, {game.name} has "
                        f"{game.num_actions} legal actions")
    if json.loads(attrs["action_meanings"]) != list(game.action_meanings):
        problems.append(f"root attribute action_meanings is not {game.name}'s legal action set")
    if tuple(json.loads(attrs["frame_shape"])) != tuple(game.frame_shape) or reader.stack != game.stack:
        problems.append(f"root attributes frame_shape {attrs['frame_shape']} and stack {reader.stack} are not "
                        f"{game.name}'s {list(game.frame_shape)} and {game.stack}")
    return problems


def _completeness_problems(e: dict[str, np.ndarray], cap: int) -> list[str]:
    """`complete` marks whole games: a complete episode ended the game or reached the episode cap;
    an incomplete one was cut by the step budget, so it did neither and is the last of its env stream."""
    complete, problems = e["complete"], []
    whole = e["terminated"] | (e["truncated"] & (e["length"] >= cap))
    if (complete & ~whole).any():
        problems.append(f"{int((complete & ~whole).sum())} episodes marked complete neither ended the game nor "
                        f"reached the {cap}-step episode cap")
    if (~complete & e["terminated"]).any():
        problems.append(f"{int((~complete & e['terminated']).sum())} episodes marked incomplete ended the game")
    _, stream = np.unique(e["env_seed"], return_inverse=True)
    last = np.full(stream.max() + 1 if len(stream) else 0, -1, dtype=np.int64)
    np.maximum.at(last, stream, e["env_episode"])  # each env stream's last episode number
    if (~complete & (e["env_episode"] < last[stream])).any():
        problems.append("an episode marked incomplete is followed by more episodes of its env stream")
    return problems


def verify_invariants(reader: DatasetReader, block_frames: int = 1 << 14, decode_frames: bool = True) -> list[str]:
    """Every structural invariant of the schema; returns the problems found (empty: valid).
    `decode_frames=False` skips decompressing every frame (the rest reads only arrays in memory)."""
    game = _game_problems(reader)
    problems: list[str] = _layout_problems(reader)
    info, s, e = reader.info, reader.steps, reader.episodes
    n, ne, nf, k = info.num_steps, info.num_episodes, info.num_frames, reader.stack
    a = int(info.attrs["num_actions"])
    for name, arr in s.items():
        if len(arr) != n:
            problems.append(f"/steps/{name} has {len(arr)} rows, the file says {n} steps")
    for name, arr in e.items():
        if len(arr) != ne:
            problems.append(f"/episodes/{name} has {len(arr)} rows, the file says {ne} episodes")
    if reader.frame_rows != nf:
        problems.append(f"/frames has {reader.frame_rows} rows, the file says {nf} frames")
    if problems:
        return game + problems  # the rest indexes by these sizes and shapes
    problems = game
    bad = ~np.isfinite(s["teacher_outputs"]).all(axis=1)
    if bad.any():
        problems.append(f"{int(bad.sum())} steps have NaN or infinite teacher outputs (first at step {int(np.argmax(bad))})")
    if (s["action"] >= a).any():
        problems.append(f"actions outside the {a} legal actions")
    L = e["length"]
    if ne:
        starts = np.concatenate([[0], np.cumsum(L)[:-1]])
        if (L < 1).any():
            problems.append("episodes of length 0")
        if not np.array_equal(e["first_step"], starts) or int(L.sum()) != n:
            problems.append("episode boundaries do not tile the steps (first_step/length)")
        frames_per = k - 1 + L + 1
        first_frame = k - 1 + np.concatenate([[0], np.cumsum(frames_per)[:-1]])
        if not np.array_equal(e["first_frame"], first_frame) or int(frames_per.sum()) != nf:
            problems.append("episode frame ranges do not tile /frames (first_frame)")
        if problems:
            return problems
        ep_of_step = np.repeat(np.arange(ne), L)
        t = np.arange(n) - np.repeat(starts, L)
        if not np.array_equal(s["episode"], ep_of_step):
            problems.append("/steps/episode does not match the episode boundaries")
        if not np.array_equal(s["frame_index"], np.repeat(e["first_frame"], L) + t):
            problems.append("/steps/frame_index does not follow the frame-once layout")
        last = starts + L - 1
        mid = np.ones(n, dtype=bool)
        mid[last] = False
        if (s["terminated"][mid] | s["truncated"][mid]).any():
            problems.append("an episode continues after a terminated or truncated step")
        ended = s["terminated"][last] | s["truncated"][last]
        if not ended.all():
            problems.append(f"{int((~ended).sum())} episodes end without terminated or truncated")
        if not (np.array_equal(e["terminated"], s["terminated"][last]) and np.array_equal(e["truncated"], s["truncated"][last])):
            problems.append("episode end flags disagree with their last steps")
        if (s["terminated"] & ~s["life_lost"]).any():
            problems.append("a game-over step is not marked life_lost")
        sums = np.add.reduceat(s["reward"].astype(np.float64), starts)
        if not np.allclose(sums, e["return"], rtol=1e-6, atol=1e-4):
            problems.append("episode returns differ from the sums of their rewards")
        if (e["policy"] >= len(info.policies)).any():
            problems.append("episodes refer to control policies missing from the `policies` attribute")
        if not ((e["epsilon"] >= 0) & (e["epsilon"] <= 1)).all():  # NaN included
            problems.append("epsilon outside [0, 1]")
        problems += _completeness_problems(e, int(info.env["max_episode_steps"]))
    for i in range(0, nf if decode_frames else 0, block_frames):
        try:
            reader.read_frames(i, i + block_frames)
        except UndecodableFrames as err:
            problems.append(err.what)
            break
    return problems


def check_teacher_outputs(reader: DatasetReader, teacher: Agent, sample: int = 1000, seed: int = 0) -> list[str]:
    """Stored outputs must equal teacher(observation) on a random sample of steps (none in a file of
    0 steps: only the teacher's identity is checked there)."""
    game = get_game(reader.game)
    head = check_agent_game(teacher, game)
    problems = []
    if teacher.sha256 != reader.info.teacher.get("sha256"):
        problems.append(f"the dataset was labelled by teacher sha256 {reader.info.teacher.get('sha256', '?')[:12]}, "
                        f"not {teacher.path} ({teacher.sha256[:12]})")
    if len(reader) == 0:
        return problems
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(reader), size=min(sample, len(reader)), replace=False))
    worst = 0.0
    for chunk in np.array_split(idx, max(1, len(idx) // 256)):
        with torch.inference_mode():
            q = teacher.net(torch.from_numpy(reader.obs(chunk)), head).numpy()
        stored = reader.steps["teacher_outputs"][chunk]
        worst = max(worst, float(np.max(np.abs(q - stored) / (1.0 + np.abs(q)))))
    if worst > 1e-4:  # batched vs unbatched inference differ in the last bits only
        problems.append(f"stored teacher outputs differ from the teacher's by up to {worst:.3g} (relative) "
                        f"on {len(idx)} sampled steps")
    return problems
