"""Teacher datasets in HDF5: schema, crash-safe writer, reader (the only module importing h5py).

One file per game, self-describing and versioned; every frame stored once and stacked observations
rebuilt on read (see `framestack`). The schema is the tables STEP_FIELDS / EPISODE_FIELDS /
ROOT_ATTRS below; `multitask dataset schema` prints them and the README reproduces them.

Crash safety. HDF5 updates its metadata in place, and a process killed while it does so leaves a
file that no longer opens (measured here: 6 of 6 killed writers, SWMR mode included). So a build
never writes into a file that readers rely on:
  1. each flush writes the completed episodes into a new *part* file `<name>.h5.parts/part-NNNNNN.h5`
     (written under a temporary name, fsynced, renamed into place);
  2. then the *master* `<name>.h5` is rewritten (temporary file + atomic rename) with virtual
     datasets (HDF5 VDS) concatenating all parts, and its counters;
  3. when the build reaches its target the master is consolidated into one ordinary file (again
     temporary file + rename) and the parts are removed. Consolidation is incremental: every
     flush also appends its arrays to `<name>.h5.staging`, so finishing a build only appends its
     last episodes (they skip the part file: a crash before the rename loses them, as it would an
     unfinished flush), writes the root attributes and renames; the staging file is never read by
     anyone and a crash simply leaves it to be rebuilt (it is deleted on resume).
     A build's last stretch (less than one flush of steps and of seconds to go) may `stage`
     episodes instead of flushing them: appended to the staging file only, no part file, no
     master. They become durable with the final rename, like the last episodes; a crash loses
     them as it loses episodes still pending a flush. After a `stage` only `stage` and `finalize` may follow (the parts no longer
     describe the staging file's rows).
`BackgroundWriter` runs all of this in a child process, so that compression and HDF5 writes
overlap the teacher's play; a flush is durable when the next flush (or finalize) returns. Part
files are written uncompressed (frames of 1 KiB or more with LZF): they are temporary.
At every instant `<name>.h5` is either the previous master or the new one, both complete, so a build
killed at any point leaves a file that opens with plain h5py, verifies, and holds every episode of
its last flush. Nothing is reported written before step 2 has completed.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import h5py
import numpy as np

from multitask.errors import UserError
from multitask.envs.framestack import join_frames, stack_indices
from multitask.data.processes import background_supported, become_helper, fork_context

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
    "builds": "JSON list, one entry per build/resume: command, seed, env seeds, steps added, time",
    "package_version, created": "writer's multitask version; creation time (UTC, ISO 8601)",
    "compression": "JSON: HDF5 filter and chunk rows per dataset",
    "layout": "'single' (one self-contained file) or 'parts' (while building: virtual datasets over the files in NAME.h5.parts/)",
    "parts": "JSON list of part files (layout 'parts' only)",
}
CONTROL_KINDS = ("teacher", "student", "mixture", "uniform")


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
    """HDF5 filters and chunk rows (chosen from bench/dataset_bench.py measurements)."""

    frames: str = "gzip"  # "gzip" | "lzf" | "none"
    level: int = 1  # gzip level (Atari frames: gzip-1 ~38x, gzip-4 ~52x; ecosystem.md)
    frame_chunk: int = 64  # frames per chunk: a chunk is decompressed whole
    step_chunk: int = 16384  # rows per chunk of per-step and per-episode arrays
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
        method = self.frames if what == "frames" else ("none" if self.temporary else "gzip")
        if method == "none":
            return {}
        if method == "lzf":
            return {"compression": "lzf"}
        return {"compression": "gzip", "compression_opts": self.level if what == "frames" else 4,
                "shuffle": what != "frames"}


# ---- errors -----------------------------------------------------------------------------------

def _open_h5(path: Path, mode: str = "r") -> h5py.File:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"dataset {path} does not exist; build it with `multitask dataset build`")
    try:
        return h5py.File(path, mode)
    except OSError as e:
        raise UserError(f"dataset {path} is corrupt or not an HDF5 file ({str(e).split('(')[0].strip()}); "
                        f"delete it and rebuild") from None


def _check_schema(f: h5py.File, path: Path) -> None:
    if f.attrs.get("schema") != SCHEMA:
        raise UserError(f"{path} is not a multitask teacher dataset (no '{SCHEMA}' schema attribute)")
    version = int(f.attrs.get("schema_version", -1))
    if version != SCHEMA_VERSION:
        raise UserError(f"dataset {path} has schema version {version}, this package reads version "
                        f"{SCHEMA_VERSION}; rebuild it with this version of multitask")


def _json_attr(f: h5py.File, name: str) -> Any:
    return json.loads(f.attrs[name])


# ---- writer -----------------------------------------------------------------------------------

def _fsync_path(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def bytes_per_step(frame_shape: Sequence[int], num_actions: int) -> int:
    """Uncompressed bytes a step adds to a dataset: one frame and its row of STEP_FIELDS."""
    row = sum(np.dtype(dtype).itemsize * (num_actions if shape == ("A",) else 1)
              for dtype, shape, _ in STEP_FIELDS.values())
    return int(np.prod(frame_shape)) + row


def parts_dir(path: Path) -> Path:
    return path.with_name(path.name + ".parts")


class Packed(NamedTuple):
    """Episodes stacked for writing: per-step arrays, per-episode arrays, frames (global row numbers).

    On its way to a BackgroundWriter's child, `frames` is the list of the episodes' frame arrays,
    received there straight into one array (`_send_packed`): concatenating a MinAtar flush's 31 MB
    of frames cost its caller 65-130 ms, mostly first-touching new memory (measured in builds;
    12-50 ms in isolation).
    """

    steps: dict[str, np.ndarray]
    episodes: dict[str, np.ndarray]
    frames: np.ndarray | list[np.ndarray]


def _num_frames(packed: Packed) -> int:
    return len(packed.frames) if isinstance(packed.frames, np.ndarray) else sum(len(f) for f in packed.frames)


def _flat(packed: Packed) -> dict[str, np.ndarray]:
    """Dataset path -> array."""
    return {**{f"steps/{k}": v for k, v in packed.steps.items()},
            **{f"episodes/{k}": v for k, v in packed.episodes.items()}, "frames": packed.frames}


def _concat_episodes(episodes: Sequence[Episode], step0: int, episode0: int, frame0: int, stack: int,
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


def _create(f: h5py.File, name: str, data: np.ndarray, comp: Compression, what: str) -> None:
    """A part file's dataset: contiguous where uncompressed, else chunked as `comp` says."""
    kwargs = comp.kwargs(what) if len(data) else {}
    chunks = (max(1, min(comp.chunk_rows(what), len(data))), *data.shape[1:]) if kwargs else None
    f.create_dataset(name, data=data, chunks=chunks, **kwargs)


def staging_path(path: Path) -> Path:
    return path.with_name(path.name + ".staging")


def _datasets(attrs: dict[str, Any]) -> dict[str, tuple[str, tuple, str]]:
    """Every dataset of a file with these root attributes: name -> (dtype, row shape, count key)."""
    num_actions = int(attrs["num_actions"])
    out = {f"{group}/{k}": (dtype, tuple(num_actions if d == "A" else d for d in shape), group)
           for group, fields in (("steps", STEP_FIELDS), ("episodes", EPISODE_FIELDS))
           for k, (dtype, shape, _) in fields.items()}
    out["frames"] = ("uint8", tuple(json.loads(attrs["frame_shape"])), "frames")
    return out


class _Staging:
    """The consolidated file, grown one flush at a time (see the crash-safety notes above)."""

    def __init__(self, path: Path, comp: Compression, datasets: dict[str, tuple[str, tuple, str]]):
        self.path, self.comp = staging_path(path), comp
        self.file = h5py.File(self.path, "w")
        for name, (dtype, row, _) in datasets.items():
            what = "frames" if name == "frames" else "steps"
            self.file.create_dataset(name, shape=(0, *row), maxshape=(None, *row), dtype=dtype,
                                     chunks=(comp.chunk_rows(what), *row), **comp.kwargs(what))
        self.parts = 0  # part files appended so far

    def append(self, arrays: dict[str, np.ndarray]) -> None:
        for name, data in arrays.items():
            ds = self.file[name]
            n = len(ds)
            ds.resize(n + len(data), axis=0)
            ds[n:] = data
        self.parts += 1

    def commit(self, target: Path, attrs: dict[str, Any]) -> None:
        for k, v in attrs.items():
            self.file.attrs[k] = v
        self.file.attrs["status"] = "complete"
        self.file.attrs["layout"] = "single"
        self.file.close()
        _fsync_path(self.path)
        os.replace(self.path, target)
        _fsync_dir(target.parent)

    def discard(self) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)


class _Sizes:
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
        return _concat_episodes(episodes, self.num_steps, self.num_episodes, int(self.attrs["num_frames"]),
                                int(self.attrs["stack"]), join_frames)

    def _count(self, packed: Packed) -> None:
        self.attrs["num_steps"] = self.num_steps + len(packed.steps["action"])
        self.attrs["num_episodes"] = self.num_episodes + len(packed.episodes["length"])
        self.attrs["num_frames"] = int(self.attrs["num_frames"]) + _num_frames(packed)


class DatasetWriter(_Sizes):
    """Appends episodes to a dataset through part files and an atomically replaced master."""

    def __init__(self, path: Path, attrs: dict[str, Any], parts: list[dict], comp: Compression):
        self.path, self.attrs, self.parts, self.comp = Path(path), attrs, parts, comp
        self._staging: _Staging | None = None
        self._durable_steps = self.num_steps  # steps in the master (or consolidated file) on disk
        self._staged_only = False  # episodes were staged without a part: no more parts or masters
        staging_path(self.path).unlink(missing_ok=True)  # a crashed build's: rebuilt from the parts

    # -- opening --

    @classmethod
    def create(cls, path: Path, attrs: dict[str, Any], comp: Compression) -> "DatasetWriter":
        """A new, empty dataset (caller checked that nothing is in the way)."""
        path = Path(path)
        for stale in (parts_dir(path), path.with_name(path.name + ".tmp"), staging_path(path)):
            if stale.is_dir():
                shutil.rmtree(stale)
            elif stale.exists():
                stale.unlink()
        attrs = {**attrs, "num_steps": 0, "num_episodes": 0, "num_frames": 0, "status": "building",
                 "compression": json.dumps(comp.__dict__)}
        w = cls(path, attrs, [], comp)
        w._publish_master()
        return w

    @classmethod
    def resume(cls, path: Path) -> "DatasetWriter":
        """Continue a dataset: a master of parts, or a consolidated file (which becomes part 0)."""
        path = Path(path)
        with _open_h5(path) as f:
            _check_schema(f, path)
            attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
            consolidated = attrs.get("layout") != "parts"
        comp = Compression(**json.loads(attrs["compression"]))
        pdir = parts_dir(path)
        if consolidated:
            pdir.mkdir(exist_ok=True)
            base = pdir / "part-000000.h5"
            if base.exists():
                base.unlink()
            try:
                os.link(path, base)  # same bytes under a second name; no copy
            except OSError:
                shutil.copyfile(path, base)
            parts = [{"file": base.name, "steps": int(attrs["num_steps"]),
                      "episodes": int(attrs["num_episodes"]), "frames": int(attrs["num_frames"])}]
        else:
            parts = json.loads(attrs["parts"])
            listed = {p["file"] for p in parts}
            for orphan in pdir.glob("part-*"):  # written but never published before a crash
                if orphan.name not in listed:
                    orphan.unlink()
        w = cls(path, {k: v for k, v in attrs.items() if k not in ("parts", "layout")}, parts, comp)
        w.attrs["status"] = "building"
        w._publish_master()
        return w

    @property
    def durable_steps(self) -> int:
        return self._durable_steps

    # -- writing --

    def flush(self, episodes: Sequence[Episode], attrs_update: dict[str, Any] | None = None) -> None:
        """Make `episodes` durable: a new part file, then a new master. Returns when both are on disk."""
        self.write(self.pack(episodes), attrs_update)

    def write(self, packed: Packed, attrs_update: dict[str, Any] | None = None) -> None:
        """`flush` of episodes already packed (by `pack`, or by a BackgroundWriter in the parent)."""
        if self._staged_only:
            raise RuntimeError(f"flush after stage on {self.path}: only stage or finalize may follow a stage")
        if attrs_update:
            self.attrs.update(attrs_update)
        steps, eps, frames = packed
        if len(frames):
            self._check_finite(packed)
            pdir = parts_dir(self.path)
            pdir.mkdir(exist_ok=True)
            name = f"part-{self._next_part_number():06d}.h5"
            tmp = pdir / (name + ".tmp")
            part_comp = self.comp.for_parts(frames[0].nbytes)
            with h5py.File(tmp, "w") as f:
                for k, v in _flat(packed).items():
                    _create(f, k, v, part_comp, k.split("/")[0])
            _fsync_path(tmp)
            os.replace(tmp, pdir / name)
            _fsync_dir(pdir)
            self.parts.append({"file": name, "steps": len(steps["action"]), "episodes": len(eps["length"]),
                               "frames": len(frames)})
            self._count(packed)
        self._publish_master()
        if len(frames):  # after the master: staging is an optimisation, never needed for durability
            self._stage_parts(upto=len(self.parts) - 1)
            self._staging.append(_flat(packed))

    def stage(self, episodes: Sequence[Episode], attrs_update: dict[str, Any] | None = None) -> None:
        """Append `episodes` to the consolidated file only (a build's last stretch; see the module notes):
        not durable until `finalize`, which then has little left to do."""
        self.stage_packed(self.pack(episodes), attrs_update)

    def stage_packed(self, packed: Packed, attrs_update: dict[str, Any] | None = None) -> None:
        """`stage` of episodes already packed."""
        if attrs_update:
            self.attrs.update(attrs_update)
        self._append_staged(packed)
        self._staged_only = True

    def _append_staged(self, packed: Packed) -> None:
        """Parts not staged yet (resumed builds), then `packed`, into the staging file; counted."""
        self._stage_parts(upto=len(self.parts))  # opens the staging file if needed
        if len(packed.frames):
            self._check_finite(packed)
            self._staging.append(_flat(packed))
            self._count(packed)

    def _stage_parts(self, upto: int) -> None:
        """Open the staging file if needed and append parts [staged, upto) read back from disk."""
        if self._staging is None:
            self._staging = _Staging(self.path, self.comp, _datasets(self.attrs))
        for p in self.parts[self._staging.parts:upto]:
            with h5py.File(parts_dir(self.path) / p["file"], "r") as f:
                self._staging.append({name: f[name][:] for name in _datasets(self.attrs)})

    def _next_part_number(self) -> int:
        return 1 + max((int(p["file"][5:11]) for p in self.parts), default=-1)

    def _publish_master(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with h5py.File(tmp, "w") as f:
            for name, (dtype, row, count) in _datasets(self.attrs).items():
                self._virtual(f, name, dtype, row, count)
            for k, v in self.attrs.items():
                f.attrs[k] = v
            f.attrs["layout"] = "parts"
            f.attrs["parts"] = json.dumps(self.parts)
        _fsync_path(tmp)
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)
        self._durable_steps = self.num_steps

    def _virtual(self, f: h5py.File, name: str, dtype: str, row: tuple, count_key: str) -> None:
        total = sum(p[count_key] for p in self.parts)
        layout = h5py.VirtualLayout(shape=(total, *row), dtype=dtype)
        offset = 0
        pdir = parts_dir(self.path).name
        for p in self.parts:
            n = p[count_key]
            if n:
                layout[offset:offset + n] = h5py.VirtualSource(f"{pdir}/{p['file']}", name, shape=(n, *row))
            offset += n
        f.create_virtual_dataset(name, layout)

    def finalize(self, attrs_update: dict[str, Any] | None = None, episodes: Sequence[Episode] = ()) -> None:
        """Make the staged consolidated file the dataset (atomically), then drop the parts.

        `episodes` (the build's last) go straight into the consolidated file, never into a part: a
        build killed before the final rename loses them, as it would lose an unfinished flush, and
        the build's tail skips a part file and a master (0.2-0.3 s of a 3 s MinAtar build).
        """
        self.commit(self.pack(episodes), attrs_update)

    def commit(self, packed: Packed, attrs_update: dict[str, Any] | None = None) -> None:
        """`finalize` of episodes already packed."""
        if attrs_update:
            self.attrs.update(attrs_update)
        self._append_staged(packed)
        self._staging.commit(self.path, self.attrs)
        self._staging = None
        self._durable_steps = self.num_steps
        shutil.rmtree(parts_dir(self.path), ignore_errors=True)

    def _check_finite(self, packed: Packed) -> None:
        if not np.isfinite(packed.steps["teacher_outputs"]).all():
            raise UserError(f"the teacher produced NaN or infinite outputs while building {self.path}; "
                            f"the teacher checkpoint is broken, retrain or re-import it")

    def close(self) -> None:
        """Stop without finalising (the master and parts stay; the staging file is dropped)."""
        if self._staging is not None:
            self._staging.discard()
            self._staging = None


class BackgroundWriter(_Sizes):
    """A DatasetWriter in a child process: part files, masters and staging overlap the caller's work.

    Same calls as DatasetWriter. At most one flush is in flight: `flush` first waits until the
    previous one is durable (its error, e.g. NaN teacher outputs, is raised there), so a crash loses
    at most the episodes of the flush in progress, as with the synchronous writer. A flush's per-step
    and per-episode arrays are packed here and go down the pipe out of band (pickle protocol 5), its
    frames one message per episode, received by the child straight into one array; all from a
    thread: 64 MiB take ~0.5 s to pass (measured), which the caller's loop would otherwise spend
    blocked (the thread waits in the kernel, without the GIL). The child ignores
    Ctrl-C (the caller decides) and is killed with its parent (Linux PR_SET_PDEATHSIG), so a killed
    build never leaves a writer behind that could race a `--resume`. Linux only (fork start):
    elsewhere `start` returns the synchronous writer.
    """

    def __init__(self, writer: DatasetWriter):
        ctx = fork_context()
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_writer_process, args=(writer, child, os.getpid()), daemon=True,
                                 name=f"writer {writer.path.name}")
        self._proc.start()
        child.close()
        self.path, self.attrs = writer.path, dict(writer.attrs)
        self.durable_steps = writer.durable_steps
        self._in_flight = False
        self._sender: threading.Thread | None = None
        self._send_error: BaseException | None = None

    @classmethod
    def start(cls, writer: DatasetWriter) -> "BackgroundWriter | DatasetWriter":
        return cls(writer) if background_supported() else writer

    def flush(self, episodes: Sequence[Episode], attrs_update: dict[str, Any] | None = None) -> None:
        self._hand_over("flush", episodes, attrs_update)

    def stage(self, episodes: Sequence[Episode], attrs_update: dict[str, Any] | None = None) -> None:
        self._hand_over("stage", episodes, attrs_update)

    def finalize(self, attrs_update: dict[str, Any] | None = None, episodes: Sequence[Episode] = ()) -> None:
        self._hand_over("finalize", episodes, attrs_update)
        self._wait()
        self.close()

    def _hand_over(self, op: str, episodes: Sequence[Episode], attrs_update: dict[str, Any] | None) -> None:
        """Once the previous operation is durable, pack here and send from a thread; count at once."""
        self._wait()
        packed = self.pack(episodes, join_frames=False)  # the child receives them into one array
        self._sender = threading.Thread(target=self._send, args=(op, packed, attrs_update),
                                        name="writer hand-off", daemon=True)
        self._sender.start()
        self._in_flight = True
        self.attrs.update(attrs_update or {})
        self._count(packed)

    def _send(self, op: str, packed: Packed, attrs_update: dict[str, Any] | None) -> None:
        try:
            _send_packed(self._conn, op, packed, attrs_update)
        except BaseException as e:  # noqa: BLE001 - raised by the caller's next _wait
            self._send_error = e

    def _wait(self) -> None:
        if not self._in_flight:
            return
        if self._sender is not None:
            self._sender.join()
            self._sender = None
        try:
            if self._send_error is not None:
                raise EOFError
            status, payload = self._conn.recv()
        except EOFError:
            self.close()
            raise RuntimeError(f"the writer process of {self.path} died; resume the build with --resume") from None
        self._in_flight = False
        if status == "error":
            self.close()
            raise payload
        self.durable_steps = payload

    def close(self) -> None:
        """Stop the child after the operation in flight (durable or not: both leave a valid file)."""
        if self._sender is not None:  # its message must end before the next one starts
            self._sender.join()
            self._sender = None
        if self._proc.is_alive():
            try:
                _send_packed(self._conn, "stop", None, None)
            except (BrokenPipeError, OSError):
                pass
            self._proc.join(timeout=60)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join()
        self._conn.close()


def _send_out_of_band(conn, message: Any) -> None:
    """Send with arrays' bytes as separate messages: no pickled copy of them (pickle protocol 5)."""
    buffers: list[pickle.PickleBuffer] = []
    head = pickle.dumps(message, protocol=5, buffer_callback=buffers.append)
    conn.send_bytes(len(buffers).to_bytes(8, "little") + head)
    for b in buffers:
        conn.send_bytes(b.raw())


def _recv_out_of_band(conn) -> Any:
    msg = conn.recv_bytes()
    count = int.from_bytes(msg[:8], "little")
    return pickle.loads(msg[8:], buffers=[conn.recv_bytes() for _ in range(count)])


def _send_packed(conn, op: str, packed: Packed | None, attrs_update: dict[str, Any] | None) -> None:
    """An operation for the writer's child: the arrays out of band, then the frames one message per
    piece, which `_recv_packed` receives straight into one array (no joined copy on either side)."""
    if packed is None:
        _send_out_of_band(conn, (op, None, attrs_update, [], None))
        return
    pieces = packed.frames  # the episodes' frame arrays (`pack(..., join_frames=False)`)
    row = pieces[0].shape[1:] if pieces else ()
    _send_out_of_band(conn, (op, packed._replace(frames=None), attrs_update, [len(p) for p in pieces], row))
    for p in pieces:
        conn.send_bytes(np.ascontiguousarray(p, dtype=np.uint8).reshape(-1))  # flat: send_bytes sends len(view) items


def _recv_packed(conn) -> tuple[str, Packed | None, dict[str, Any] | None]:
    op, packed, attrs_update, lengths, row = _recv_out_of_band(conn)
    if packed is None:
        return op, None, attrs_update
    frames = np.empty((sum(lengths), *row), dtype=np.uint8)
    flat, offset, row_bytes = memoryview(frames.reshape(-1)), 0, int(np.prod(row, dtype=np.int64))
    for n in lengths:
        got = conn.recv_bytes_into(flat, offset)
        if got != n * row_bytes:  # a message out of step would leave both sides waiting forever
            raise RuntimeError(f"writer hand-off out of step: a piece of {got} bytes, expected {n * row_bytes}")
        offset += got
    return op, packed._replace(frames=frames), attrs_update


def _writer_process(writer: DatasetWriter, conn, parent: int) -> None:
    """Child side of BackgroundWriter: run the parent's calls in order, answer each."""
    if not become_helper(parent):
        return
    while True:
        try:
            op, packed, attrs_update = _recv_packed(conn)
        except EOFError:
            op = "stop"
        if op == "stop":
            writer.close()
            return
        try:
            if op == "flush":
                writer.write(packed, attrs_update)
            elif op == "stage":
                writer.stage_packed(packed, attrs_update)
            else:
                writer.commit(packed, attrs_update)
            conn.send(("ok", writer.durable_steps))
        except BaseException as e:  # noqa: BLE001 - handed to the parent, which raises it
            writer.close()
            try:
                conn.send(("error", e))
            except Exception:  # not picklable
                conn.send(("error", RuntimeError(f"{type(e).__name__}: {e}")))
            return


def remove_dataset(path: Path) -> None:
    """Delete a dataset with its parts and temporaries (for --overwrite and failed new builds)."""
    path = Path(path)
    for p in (path, path.with_name(path.name + ".tmp"), staging_path(path)):
        if p.exists():
            p.unlink()
    shutil.rmtree(parts_dir(path), ignore_errors=True)


def dataset_exists(path: Path) -> bool:
    path = Path(path)
    return path.exists() or parts_dir(path).exists()


# ---- reader -----------------------------------------------------------------------------------

class Batch(NamedTuple):
    """What a trainer reads: one game's rows (indices into /steps)."""

    game: str
    obs: np.ndarray  # (B, *obs_shape) uint8, rebuilt bit-identical from frames
    teacher_outputs: np.ndarray  # (B, A) float32 raw
    action: np.ndarray  # (B,)
    reward: np.ndarray  # (B,) float32 raw
    terminated: np.ndarray  # (B,) bool
    truncated: np.ndarray  # (B,) bool
    life_lost: np.ndarray  # (B,) bool
    next_obs: np.ndarray  # (B, *obs_shape) uint8


@dataclass
class DatasetInfo:
    path: Path
    game: str
    env: dict[str, Any]
    teacher: dict[str, Any]
    policies: list[dict[str, Any]]
    num_steps: int
    num_episodes: int
    num_frames: int
    target_steps: int
    status: str
    attrs: dict[str, Any] = field(repr=False)


class DatasetReader:
    """Random access to a dataset: by index and by batch, observations rebuilt from frames.

    Per-step and per-episode arrays (a few tens of bytes per step) are read into memory on open.
    Frames stay on disk and are read a whole HDF5 chunk at a time into an LRU cache of decompressed
    chunks (`cache_bytes`), or all at once with `load_frames()` when they fit in memory; reading
    single rows from compressed chunks would decompress a chunk per row (ecosystem.md).
    """

    def __init__(self, path: Path, cache_bytes: int = 256 << 20):
        self.path = Path(path)
        self.file = _open_h5(self.path)
        try:
            _check_schema(self.file, self.path)
            attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in self.file.attrs.items()}
            self.info = DatasetInfo(
                path=self.path, game=f"{attrs['suite']}/{attrs['game']}", env=json.loads(attrs["env"]),
                teacher=json.loads(attrs["teacher"]), policies=json.loads(attrs["policies"]),
                num_steps=int(attrs["num_steps"]), num_episodes=int(attrs["num_episodes"]),
                num_frames=int(attrs["num_frames"]), target_steps=int(attrs["target_steps"]),
                status=str(attrs["status"]), attrs=attrs)
            self.stack = int(attrs["stack"])
            self.steps = {k: self.file[f"steps/{k}"][:] for k in STEP_FIELDS}
            self.episodes = {k: self.file[f"episodes/{k}"][:] for k in EPISODE_FIELDS}
            self._frames_ds = self.file["frames"]
        except (KeyError, OSError, ValueError) as e:
            self.file.close()
            raise UserError(f"dataset {self.path} is damaged or incomplete ({type(e).__name__}: "
                            f"{str(e)[:100]}); run `multitask dataset verify` or rebuild it") from None
        self._frames: np.ndarray | None = None
        self._chunk = (self._frames_ds.chunks or (1 << 12,))[0]
        self._cache: dict[int, np.ndarray] = {}
        self._cache_limit = max(1, cache_bytes // max(1, self._chunk * int(np.prod(self._frames_ds.shape[1:]))))

    def __len__(self) -> int:
        return self.info.num_steps

    def close(self) -> None:
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def game(self) -> str:
        return self.info.game

    @property
    def frames_nbytes(self) -> int:
        return int(np.prod(self._frames_ds.shape)) * self._frames_ds.dtype.itemsize

    def load_frames(self) -> None:
        """Decompress every frame into memory (fast random access afterwards)."""
        if self._frames is None:
            self._frames = self._frames_ds[:]

    def frames(self, rows: np.ndarray) -> np.ndarray:
        """Frames at arbitrary rows (any order, repeats allowed): (len(rows), C, H, W)."""
        rows = np.asarray(rows)
        if self._frames is not None:
            return self._frames[rows]
        out = np.empty((rows.size, *self._frames_ds.shape[1:]), dtype=np.uint8)
        flat = rows.reshape(-1)
        chunk_ids = flat // self._chunk
        for c in np.unique(chunk_ids):
            block = self._chunk_data(int(c))
            sel = chunk_ids == c
            out[sel] = block[flat[sel] - c * self._chunk]
        return out.reshape(*rows.shape, *self._frames_ds.shape[1:])

    def _chunk_data(self, c: int) -> np.ndarray:
        block = self._cache.pop(c, None)
        if block is None:
            block = self._frames_ds[c * self._chunk:(c + 1) * self._chunk]
            if len(self._cache) >= self._cache_limit:
                self._cache.pop(next(iter(self._cache)))  # least recently used
        self._cache[c] = block  # (re)insert as most recently used
        return block

    def _stacked(self, frame_index: np.ndarray) -> np.ndarray:
        return join_frames(self.frames(stack_indices(frame_index, self.stack)))  # (B, k*C, H, W)

    def obs(self, idx) -> np.ndarray:
        """Stacked observations s_t for step indices (B,) -> (B, *obs_shape)."""
        return self._stacked(self.steps["frame_index"][np.asarray(idx)])

    def next_obs(self, idx) -> np.ndarray:
        return self._stacked(self.steps["frame_index"][np.asarray(idx)] + 1)

    def batch(self, idx) -> Batch:
        idx = np.asarray(idx)
        fi = self.steps["frame_index"][idx]
        both = self._stacked(np.concatenate([fi, fi + 1]))  # one pass over frames for s_t and s_{t+1}
        s = self.steps
        return Batch(self.game, both[: len(idx)], s["teacher_outputs"][idx], s["action"][idx],
                     s["reward"][idx], s["terminated"][idx], s["truncated"][idx], s["life_lost"][idx],
                     both[len(idx):])

    def __getitem__(self, i: int) -> Batch:
        b = self.batch(np.array([i]))
        return Batch(b.game, *(x[0] for x in b[1:]))


def has_teacher_outputs(path: Path) -> bool:
    """Whether a file has /steps/teacher_outputs (unreadable files answer True: the reader names the problem)."""
    try:
        with h5py.File(path, "r") as f:
            return "steps/teacher_outputs" in f
    except OSError:
        return True


def disk_bytes(path: Path) -> int:
    path = Path(path)
    total = path.stat().st_size if path.exists() else 0
    pdir = parts_dir(path)
    if pdir.exists():
        total += sum(p.stat().st_size for p in pdir.iterdir())
    return total


def schema_markdown() -> str:
    """The schema as Markdown tables (README, `multitask dataset schema`)."""
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


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ---- invariants -------------------------------------------------------------------------------

def verify_invariants(reader: DatasetReader, block_frames: int = 1 << 14) -> list[str]:
    """Every structural invariant of the schema; returns the problems found (empty: valid)."""
    problems: list[str] = []
    info, s, e = reader.info, reader.steps, reader.episodes
    n, ne, nf, k = info.num_steps, info.num_episodes, info.num_frames, reader.stack
    a = int(info.attrs["num_actions"])
    for name, arr in s.items():
        if len(arr) != n:
            problems.append(f"/steps/{name} has {len(arr)} rows, the file says {n} steps")
    for name, arr in e.items():
        if len(arr) != ne:
            problems.append(f"/episodes/{name} has {len(arr)} rows, the file says {ne} episodes")
    if len(reader._frames_ds) != nf:
        problems.append(f"/frames has {len(reader._frames_ds)} rows, the file says {nf} frames")
    if problems:
        return problems  # the rest indexes by these sizes
    if s["teacher_outputs"].shape[1:] != (a,):
        problems.append(f"teacher outputs have shape {s['teacher_outputs'].shape[1:]}, expected ({a},)")
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
        if ((e["epsilon"] < 0) | (e["epsilon"] > 1)).any():
            problems.append("epsilon outside [0, 1]")
    for i in range(0, nf, block_frames):
        try:
            reader._frames_ds[i:i + block_frames]
        except (OSError, ValueError, KeyError) as err:
            problems.append(f"frames {i}..{min(nf, i + block_frames) - 1} cannot be decoded ({str(err)[:80]})")
            break
    return problems
