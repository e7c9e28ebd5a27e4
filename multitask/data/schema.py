"""The dataset's schema: what a teacher-dataset file holds, defined once.

One file per game, self-describing and versioned; every frame stored once and stacked observations
rebuilt on read (see `framestack`). The schema is the tables STEP_FIELDS / EPISODE_FIELDS /
ROOT_ATTRS below; `multitask dataset schema` prints them and docs/datasets.md reproduces them.
Writers take the schema's identifying attributes from `schema_attrs` and readers check them with
`check_schema`, so the name and version are written in this module only.

Also here: `Episode`, one episode in memory as the recorder hands it to a writer, and
`Compression`, the HDF5 filters and chunk rows a file is written with (stored in its root
attribute `compression`). No h5py here: the writer and the reader apply these tables.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from multitask.errors import UserError

DATASETS_DIR = Path("datasets")  # default home of the per-game files: datasets/<suite>/<Game>.h5


def dataset_path(game, folder: Path | str | None = None) -> Path:
    """Where a game's dataset lives by default: `<folder>/<Game>.h5`, the folder being
    datasets/<suite>/ unless given (`game`: a GameSpec)."""
    return (Path(folder) if folder is not None else DATASETS_DIR / game.suite) / f"{game.game}.h5"

SCHEMA = "multitask-teacher-dataset"
SCHEMA_VERSION = 1

# name -> (dtype, per-row shape ("A" = number of legal actions), meaning)
STEP_FIELDS: dict[str, tuple[str, tuple, str]] = {
    "frame_index": ("int64", (), "row in /frames of the newest frame of observation s_t; "
                                 "s_t = frames[i - stack + 1 : i + 1] stacked on the channel axis, "
                                 "s_{t+1} = the same at i + 1"),
    "teacher_outputs": ("float32", ("A",), "raw teacher outputs for s_t over the legal actions "
                                           "(Q-values for a DQN teacher; never a softmax)"),
    "action": ("uint8", (), "index into the legal action set of the action the control policy took"),
    "reward": ("float32", (), "raw (unclipped) game reward of the step"),
    "terminated": ("bool", (), "the game ended at this step (game over)"),
    "truncated": ("bool", (), "the episode was cut after this step (time limit, or step budget for an incomplete episode)"),
    "life_lost": ("bool", (), "a life was lost at this step (true at game over too)"),
    "episode": ("int32", (), "row in /episodes of the step's episode"),
}
EPISODE_FIELDS: dict[str, tuple[str, tuple, str]] = {
    "first_step": ("int64", (), "row in /steps of the episode's first step"),
    "length": ("int64", (), "number of steps"),
    "first_frame": ("int64", (), "row in /frames of s_0's newest frame (the stack-1 rows before it are s_0's older frames)"),
    "return": ("float64", (), "raw return: the whole-game score for a complete episode"),
    "terminated": ("bool", (), "ended by game over"),
    "truncated": ("bool", (), "ended by the episode cap or cut by the build's step budget"),
    "complete": ("bool", (), "a whole game (false only for episodes cut by the step budget at the end of a build)"),
    "policy": ("uint16", (), "index into the root attribute `policies`: the control policy that played it"),
    "epsilon": ("float32", (), "epsilon of the epsilon-greedy control policy"),
    "env_seed": ("int64", (), "seed of the env stream that played it (stream reset once with this seed)"),
    "env_episode": ("int32", (), "0-based number of this episode within its env stream"),
}
ROOT_ATTRS: dict[str, str] = {
    "schema": f"'{SCHEMA}'",
    "schema_version": f"{SCHEMA_VERSION}; readers refuse other versions",
    "suite, game, env_id": "the game, e.g. 'atari', 'Breakout', and the emulator's id",
    "env": "JSON: the env spec (frame shape, stack, action meanings, episode cap, full preprocessing)",
    "action_meanings": "JSON list, in head/action-index order",
    "frame_shape, stack, num_actions": "(C, H, W) of one frame; frames per observation; number of legal actions A",
    "teacher": "JSON: path, sha256 and card summary of the teacher that labelled every step",
    "teacher_output_kind": "'q_values' (DQN teachers) or 'logits'",
    "temperature": "'none': outputs are stored raw; distillation losses apply tau on the teacher side",
    "policies": "JSON list of control policies (kind: teacher, student, mixture or uniform; identity)",
    "target_steps, status": "the build's requested size; 'building' or 'complete'",
    "num_steps, num_episodes, num_frames": "committed sizes",
    "builds": "JSON list, one entry per build/resume: command, seed, env seeds, steps added, time, and the build settings used (`config`)",
    "package_version, created": "writer's multitask version; creation time (UTC, ISO 8601)",
    "compression": "JSON: HDF5 filter and chunk rows per dataset",
    "layout": "'single' (one self-contained file) or 'parts' (while building: virtual datasets over the files in NAME.h5.parts/)",
    "parts": "JSON list of part files (layout 'parts' only)",
}


def schema_attrs() -> dict[str, Any]:
    """The root attributes that identify a file as this schema, at this version (writers start with them)."""
    return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION}


def check_schema(attrs: Mapping[str, Any], path: Path) -> None:
    """Refuse files of another schema or version, naming the file and the fix."""
    if attrs.get("schema") != SCHEMA:
        raise UserError(f"{path} is not a multitask teacher dataset (no '{SCHEMA}' schema attribute)")
    version = int(attrs.get("schema_version", -1))
    if version != SCHEMA_VERSION:
        raise UserError(f"dataset {path} has schema version {version}, this package reads version "
                        f"{SCHEMA_VERSION}; rebuild it with this version of multitask")
    missing = missing_attrs(attrs)
    if missing:
        raise UserError(f"dataset {path} lacks the root attribute{'s' if len(missing) > 1 else ''} "
                        f"{', '.join(missing)} that the schema requires: it is damaged; rebuild it "
                        f"(`multitask dataset build ... --overwrite`)")


def missing_attrs(attrs: Mapping[str, Any]) -> list[str]:
    """The ROOT_ATTRS a file lacks (`parts` is required of layout 'parts' only)."""
    names = [n.strip() for key in ROOT_ATTRS for n in key.split(",")]
    return [n for n in names if n not in attrs and (n != "parts" or attrs.get("layout") == "parts")]


def dataset_layout(attrs: Mapping[str, Any]) -> dict[str, tuple[str, tuple, str]]:
    """Every dataset of a file with these root attributes: name -> (dtype, row shape, count key)."""
    num_actions = int(attrs["num_actions"])
    out = {f"{group}/{k}": (dtype, tuple(num_actions if d == "A" else d for d in shape), group)
           for group, fields in (("steps", STEP_FIELDS), ("episodes", EPISODE_FIELDS))
           for k, (dtype, shape, _) in fields.items()}
    out["frames"] = ("uint8", tuple(json.loads(attrs["frame_shape"])), "frames")
    return out


def parts_dir(path: Path) -> Path:
    """The folder of a building dataset's part files (root attribute `layout` 'parts')."""
    return path.with_name(path.name + ".parts")


def bytes_per_step(frame_shape: Sequence[int], num_actions: int) -> int:
    """Uncompressed bytes a step adds to a dataset: one frame and its row of STEP_FIELDS."""
    row = sum(np.dtype(dtype).itemsize * (num_actions if shape == ("A",) else 1)
              for dtype, shape, _ in STEP_FIELDS.values())
    return int(np.prod(frame_shape)) + row


def now_iso() -> str:
    """A time as the schema's time attributes hold it (`created`, the builds' times): UTC, ISO 8601."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class Episode:
    """One finished (or budget-cut) episode in memory, in the frame-once layout."""

    frames: np.ndarray  # (stack - 1 + length + 1, C, H, W) uint8: pads, s_0 .. s_length
    teacher_outputs: np.ndarray  # (length, A) float32
    action: np.ndarray  # (length,)
    reward: np.ndarray  # (length,) float32
    terminated: np.ndarray  # (length,) bool
    truncated: np.ndarray  # (length,) bool
    life_lost: np.ndarray  # (length,) bool
    complete: bool
    policy: int
    epsilon: float
    env_seed: int
    env_episode: int

    @property
    def length(self) -> int:
        return len(self.action)


@dataclass
class Compression:
    """HDF5 filters and chunk rows of a file. The defaults, and the measurements behind them, are
    the dataset build's config (`build_config.DatasetConfig.compression`); this is what one file
    uses, stored as JSON in its root attribute `compression` (field order included)."""

    frames: str  # "gzip" | "lzf" | "none"
    level: int  # gzip level for frames
    frame_chunk: int  # frames per chunk: a chunk is decompressed whole
    step_chunk: int  # rows per chunk of per-step and per-episode arrays
    temporary: bool = False  # part files: per-step and per-episode arrays uncompressed (see for_parts)

    def for_parts(self, frame_bytes: int) -> "Compression":
        """Part files live only while a build runs (or until a crashed build is resumed); the
        consolidated file keeps this compression. Compressing them was most of the writer's time
        (gzip-4 of the per-step arrays, LZF of MinAtar's 400-byte frames: 1.36 CPU-s per 200k MinAtar
        steps vs 0.58 uncompressed; measured), so only frames of 1 KiB or more are compressed, with
        LZF, to keep an Atari build's temporary files small (7 KB per raw frame, 150 B with LZF)."""
        frames = "lzf" if self.frames != "none" and frame_bytes >= 1024 else "none"
        return replace(self, frames=frames, temporary=True)

    def chunk_rows(self, what: str) -> int:
        return self.frame_chunk if what == "frames" else self.step_chunk

    def kwargs(self, what: str) -> dict[str, Any]:
        """h5py `create_dataset` filter arguments for frames (`what == "frames"`) or per-row arrays."""
        method = self.frames if what == "frames" else ("none" if self.temporary else "gzip")
        if method == "none":
            return {}
        if method == "lzf":
            return {"compression": "lzf"}
        return {"compression": "gzip", "compression_opts": self.level if what == "frames" else 4,
                "shuffle": what != "frames"}


def schema_markdown() -> str:
    """The schema as Markdown tables (docs/datasets.md, `multitask dataset schema`)."""
    lines = ["| dataset | dtype | shape | meaning |", "|---|---|---|---|"]
    lines.append("| `/frames` | uint8 | (F, C, H, W) | every frame once: per episode its stack-1 older "
                 "frames of s_0, then the newest frame of s_0, s_1, ..., s_T (T = length) |")
    for group, fields in (("steps", STEP_FIELDS), ("episodes", EPISODE_FIELDS)):
        n = "N" if group == "steps" else "E"
        for k, (dtype, shape, meaning) in fields.items():
            shp = "(" + ", ".join([n, *map(str, shape)]) + (",)" if not shape else ")")
            lines.append(f"| `/{group}/{k}` | {dtype} | {shp} | {meaning} |")
    lines += ["", "| root attribute | meaning |", "|---|---|"]
    lines += [f"| `{k}` | {v} |" for k, v in ROOT_ATTRS.items()]
    return "\n".join(lines)
