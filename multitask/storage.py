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
     temporary file + rename) and the parts are removed.
At every instant `<name>.h5` is either the previous master or the new one, both complete, so a build
killed at any point leaves a file that opens with plain h5py, verifies, and holds every episode of
its last flush. Nothing is reported written before step 2 has completed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import h5py
import numpy as np

from multitask.errors import UserError
from multitask.framestack import stack_indices

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

    def kwargs(self, what: str) -> dict[str, Any]:
        method = self.frames if what == "frames" else "gzip"
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


def parts_dir(path: Path) -> Path:
    return path.with_name(path.name + ".parts")


def _concat_episodes(episodes: Sequence[Episode], step0: int, episode0: int, frame0: int,
                     stack: int) -> tuple[dict, dict, np.ndarray]:
    """Stack episodes into per-step, per-episode and frame arrays with global row indices."""
    steps: dict[str, list] = {k: [] for k in STEP_FIELDS}
    eps: dict[str, list] = {k: [] for k in EPISODE_FIELDS}
    s, fr = step0, frame0
    for k, ep in enumerate(episodes):
        first_frame = fr + stack - 1
        L = ep.length
        steps["frame_index"].append(np.arange(first_frame, first_frame + L, dtype=np.int64))
        for name in ("teacher_outputs", "action", "reward", "terminated", "truncated", "life_lost"):
            steps[name].append(getattr(ep, name))
        steps["episode"].append(np.full(L, episode0 + k, dtype=np.int32))
        values = {"first_step": s, "length": L, "first_frame": first_frame,
                  "return": float(np.sum(ep.reward, dtype=np.float64)),
                  "terminated": bool(ep.terminated[-1]), "truncated": bool(ep.truncated[-1]),
                  "complete": ep.complete, "policy": ep.policy, "epsilon": ep.epsilon,
                  "env_seed": ep.env_seed, "env_episode": ep.env_episode}
        for name, v in values.items():
            eps[name].append(v)
        s += L
        fr += len(ep.frames)
    step_arrays = {k: np.concatenate(v).astype(STEP_FIELDS[k][0]) for k, v in steps.items()}
    ep_arrays = {k: np.asarray(v, dtype=EPISODE_FIELDS[k][0]) for k, v in eps.items()}
    return step_arrays, ep_arrays, np.concatenate([ep.frames for ep in episodes])


def _create(f: h5py.File, name: str, data: np.ndarray, comp: Compression, what: str) -> None:
    rows = comp.frame_chunk if what == "frames" else comp.step_chunk
    chunks = (max(1, min(rows, len(data))), *data.shape[1:]) if len(data) else None
    f.create_dataset(name, data=data, chunks=chunks, **(comp.kwargs(what) if len(data) else {}))


class DatasetWriter:
    """Appends episodes to a dataset through part files and an atomically replaced master."""

    def __init__(self, path: Path, attrs: dict[str, Any], parts: list[dict], comp: Compression):
        self.path, self.attrs, self.parts, self.comp = Path(path), attrs, parts, comp

    # -- opening --

    @classmethod
    def create(cls, path: Path, attrs: dict[str, Any], comp: Compression) -> "DatasetWriter":
        """A new, empty dataset (caller checked that nothing is in the way)."""
        path = Path(path)
        for stale in (parts_dir(path), path.with_name(path.name + ".tmp")):
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

    # -- sizes --

    @property
    def num_steps(self) -> int:
        return int(self.attrs["num_steps"])

    @property
    def num_episodes(self) -> int:
        return int(self.attrs["num_episodes"])

    # -- writing --

    def flush(self, episodes: Sequence[Episode], attrs_update: dict[str, Any] | None = None) -> None:
        """Make `episodes` durable: a new part file, then a new master. Returns when both are on disk."""
        if attrs_update:
            self.attrs.update(attrs_update)
        if episodes:
            stack = int(self.attrs["stack"])
            steps, eps, frames = _concat_episodes(episodes, self.num_steps, self.num_episodes,
                                                  int(self.attrs["num_frames"]), stack)
            if not np.isfinite(steps["teacher_outputs"]).all():
                raise UserError(f"the teacher produced NaN or infinite outputs while building {self.path}; "
                                f"the teacher checkpoint is broken, retrain or re-import it")
            pdir = parts_dir(self.path)
            pdir.mkdir(exist_ok=True)
            name = f"part-{self._next_part_number():06d}.h5"
            tmp = pdir / (name + ".tmp")
            with h5py.File(tmp, "w") as f:
                for k, v in steps.items():
                    _create(f, f"steps/{k}", v, self.comp, "steps")
                for k, v in eps.items():
                    _create(f, f"episodes/{k}", v, self.comp, "episodes")
                _create(f, "frames", frames, self.comp, "frames")
            _fsync_path(tmp)
            os.replace(tmp, pdir / name)
            _fsync_dir(pdir)
            self.parts.append({"file": name, "steps": len(steps["action"]), "episodes": len(episodes),
                               "frames": len(frames)})
            self.attrs["num_steps"] = self.num_steps + len(steps["action"])
            self.attrs["num_episodes"] = self.num_episodes + len(episodes)
            self.attrs["num_frames"] = int(self.attrs["num_frames"]) + len(frames)
        self._publish_master()

    def _next_part_number(self) -> int:
        return 1 + max((int(p["file"][5:11]) for p in self.parts), default=-1)

    def _publish_master(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        num_actions = int(self.attrs["num_actions"])
        frame_shape = tuple(json.loads(self.attrs["frame_shape"]))
        with h5py.File(tmp, "w") as f:
            for group, fields, count in (("steps", STEP_FIELDS, "steps"), ("episodes", EPISODE_FIELDS, "episodes")):
                for k, (dtype, shape, _) in fields.items():
                    row = tuple(num_actions if d == "A" else d for d in shape)
                    self._virtual(f, f"{group}/{k}", dtype, row, count)
            self._virtual(f, "frames", "uint8", frame_shape, "frames")
            for k, v in self.attrs.items():
                f.attrs[k] = v
            f.attrs["layout"] = "parts"
            f.attrs["parts"] = json.dumps(self.parts)
        _fsync_path(tmp)
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)

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

    def finalize(self, attrs_update: dict[str, Any] | None = None) -> None:
        """Consolidate master + parts into one ordinary file (atomically), then drop the parts."""
        if attrs_update:
            self.attrs.update(attrs_update)
        tmp = self.path.with_name(self.path.name + ".tmp")
        block = 1 << 16
        with h5py.File(self.path, "r") as src, h5py.File(tmp, "w") as dst:
            for name in [f"steps/{k}" for k in STEP_FIELDS] + [f"episodes/{k}" for k in EPISODE_FIELDS] + ["frames"]:
                what = "frames" if name == "frames" else "steps"
                ds = src[name]
                rows = self.comp.frame_chunk if what == "frames" else self.comp.step_chunk
                out = dst.create_dataset(name, shape=ds.shape, dtype=ds.dtype,
                                         chunks=(max(1, min(rows, len(ds))), *ds.shape[1:]) if len(ds) else None,
                                         **(self.comp.kwargs(what) if len(ds) else {}))
                step = max(rows, (block // rows) * rows) if what == "frames" else 1 << 20
                for i in range(0, len(ds), step):
                    out[i:i + step] = ds[i:i + step]
            for k, v in self.attrs.items():
                dst.attrs[k] = v
            dst.attrs["status"] = "complete"
            dst.attrs["layout"] = "single"
        _fsync_path(tmp)
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)
        shutil.rmtree(parts_dir(self.path), ignore_errors=True)


def remove_dataset(path: Path) -> None:
    """Delete a dataset with its parts and temporaries (for --overwrite and failed new builds)."""
    path = Path(path)
    for p in (path, path.with_name(path.name + ".tmp")):
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
        f = self.frames(stack_indices(frame_index, self.stack))  # (B, k, C, H, W)
        b, k, c, h, w = f.shape
        return f.reshape(b, k * c, h, w)

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
