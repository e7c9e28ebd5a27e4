"""Reading teacher datasets: open and check a file, random access to its steps and frames.

`DatasetReader` holds the per-step and per-episode arrays in memory (a few tens of bytes per step)
and reads frames from disk a whole HDF5 chunk at a time: reading single rows from compressed
chunks would decompress a chunk per row (ecosystem.md). Its chunk API (`chunk_rows`, `num_chunks`,
`read_frames`, `read_chunks`, `gather`) is how the loader's windows and `verify` read frames;
nothing outside this module touches the HDF5 objects. Files that cannot be opened, are not this
schema, or are damaged end in one `UserError` naming the file and the fix.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import h5py
import numpy as np

from multitask.data.schema import EPISODE_FIELDS, STEP_FIELDS, check_schema, parts_dir
from multitask.envs.framestack import join_frames, stack_indices
from multitask.errors import UserError

DEFAULT_CHUNK_ROWS = 1 << 12  # frames per "chunk" of a file stored contiguously (no HDF5 chunks)


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def file_kind(path: Path) -> str:
    """What an existing file looks like from its first bytes: 'hdf5' (the HDF5 signature at offset
    0, 512, 1024, ..., where HDF5 itself looks for it), 'checkpoint' (a zip, as torch.save writes,
    or a pickle, torch's legacy format) or 'other'. Raises OSError if the file cannot be read."""
    with open(path, "rb") as f:
        head = f.read(8)
        if head == HDF5_SIGNATURE:
            return "hdf5"
        size, offset = os.fstat(f.fileno()).st_size, 512
        while offset + len(HDF5_SIGNATURE) <= size:
            f.seek(offset)
            if f.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE:
                return "hdf5"
            offset *= 2
    if head[:2] == b"PK" or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5):
        return "checkpoint"
    return "other"


def not_a_dataset(path: Path, kind: str) -> str:
    """Why `path` (of `file_kind` `kind`, not 'hdf5') is no dataset: the start of a one-sentence message."""
    if kind == "checkpoint":
        return f"{path} is not a dataset: it looks like a PyTorch checkpoint (a teacher or student), not an HDF5 file"
    return f"{path} is not a dataset: it is not an HDF5 file (corrupt, or another kind of file)"


def open_h5(path: Path, mode: str = "r") -> h5py.File:
    """Open a dataset file, or say in one sentence why it cannot be opened: only a file that looks
    like a damaged HDF5 file is one to delete and rebuild (never, say, a teacher checkpoint)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"dataset {path} does not exist; build it with `multitask dataset build`")
    try:
        return h5py.File(path, mode)
    except OSError as e:
        reason = str(e).split('(')[0].strip()
    try:
        kind = file_kind(path)
    except OSError as e:
        raise UserError(f"cannot read dataset {path} ({e.strerror or e}); check its permissions") from None
    if kind == "hdf5":
        raise UserError(f"dataset {path} is corrupt: an HDF5 file that cannot be read ({reason}); "
                        f"delete it and rebuild") from None
    raise UserError(f"{not_a_dataset(path, kind)}; pass a dataset made by `multitask dataset build` "
                    f"(datasets/<suite>/<Game>.h5)") from None


def _attrs(f: h5py.File) -> dict[str, Any]:
    """Root attributes as Python values (numpy scalars unwrapped)."""
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}


def root_attrs(path: Path) -> dict[str, Any]:
    """The root attributes of a dataset of this schema (checked), without reading its arrays."""
    with open_h5(path) as f:
        check_schema(f.attrs, Path(path))
        return _attrs(f)


class UndecodableFrames(UserError):
    """Frames a dataset holds but cannot decode (a damaged compressed chunk); `what` says which."""

    def __init__(self, path: Path, what: str):
        super().__init__(f"dataset {path} is corrupt: {what}; delete it and rebuild")
        self.what = what


def check_parts(path: Path, attrs: Mapping[str, Any]) -> None:
    """A build in progress (layout 'parts') reads its arrays from the part files its `parts`
    attribute lists; HDF5 reads a missing or unreadable source of a virtual dataset as zeros, without
    an error. So refuse, in one sentence, a master whose part files are missing, damaged or short."""
    if attrs.get("layout") != "parts":
        return
    path = Path(path)
    pdir = parts_dir(path)
    missing, damaged = [], []
    for p in json.loads(attrs["parts"]):
        part = pdir / p["file"]
        if not part.is_file():
            missing.append(p["file"])
            continue
        try:
            with h5py.File(part, "r") as f:
                rows = {"steps": len(f["steps/action"]), "episodes": len(f["episodes/length"]),
                        "frames": len(f["frames"])}
        except (OSError, KeyError, ValueError):
            damaged.append(p["file"])
            continue
        if any(rows[k] != int(p[k]) for k in rows):
            damaged.append(p["file"])
    head = f"dataset {path} is a build in progress whose part file"
    if missing:
        raise UserError(f"{head}{_names(missing)} in {pdir} {'are' if len(missing) > 1 else 'is'} missing; keep "
                        f"{path.name} and its folder {pdir.name} side by side, or rebuild it with --overwrite")
    if damaged:
        raise UserError(f"{head}{_names(damaged)} in {pdir} cannot be read (damaged or truncated); rebuild it "
                        f"with --overwrite")


def _names(files: list[str]) -> str:
    """`s a, b, c ...` or ` a`: the files, the first three named, after 'file'."""
    return f"{'s' if len(files) > 1 else ''} {', '.join(files[:3])}{' ...' if len(files) > 3 else ''}"


def gather_frames(rows: np.ndarray, chunk_rows: int, frame_shape: tuple[int, ...],
           block: Callable[[int], np.ndarray]) -> np.ndarray:
    """Frames at arbitrary rows (any order, repeats allowed), each chunk's block fetched once:
    `block(c)` holds rows [c * chunk_rows, (c + 1) * chunk_rows). Returns (*rows.shape, *frame_shape)."""
    rows = np.asarray(rows)
    out = np.empty((rows.size, *frame_shape), dtype=np.uint8)
    flat = rows.reshape(-1)
    chunk_ids = flat // chunk_rows
    for c in np.unique(chunk_ids):
        sel = chunk_ids == c
        out[sel] = block(int(c))[flat[sel] - c * chunk_rows]
    return out.reshape(*rows.shape, *frame_shape)


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

    Per-step and per-episode arrays are read into memory on open. Frames stay on disk and are read a
    whole HDF5 chunk at a time into an LRU cache of decompressed chunks (`cache_bytes`, at least one
    chunk), or all at once with `load_frames()` when they fit in memory.
    """

    def __init__(self, path: Path, cache_bytes: int = 256 << 20):
        self.path = Path(path)
        self.file = open_h5(self.path)
        try:
            check_schema(self.file.attrs, self.path)
            attrs = _attrs(self.file)
            check_parts(self.path, attrs)
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
        except UserError:
            self.file.close()
            raise
        except (KeyError, OSError, ValueError) as e:
            self.file.close()
            raise UserError(f"dataset {self.path} is damaged or incomplete ({type(e).__name__}: "
                            f"{str(e)[:100]}); delete it and rebuild it") from None
        self._frames: np.ndarray | None = None
        self.chunk_rows: int = (self._frames_ds.chunks or (DEFAULT_CHUNK_ROWS,))[0]  # frames per chunk
        self.frame_shape: tuple[int, ...] = tuple(self._frames_ds.shape[1:])  # (C, H, W)
        self.frame_dtype: np.dtype = self._frames_ds.dtype
        self.frame_rows: int = len(self._frames_ds)  # rows stored in /frames (info.num_frames: what the file claims)
        self._cache: dict[int, np.ndarray] = {}
        chunk_bytes = self.chunk_rows * int(np.prod(self.frame_shape))
        self._cache_limit = max(1, cache_bytes // max(1, chunk_bytes))

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
        return self.frame_rows * int(np.prod(self.frame_shape))

    # -- frames: whole chunks --

    @property
    def num_chunks(self) -> int:
        return -(-self.frame_rows // self.chunk_rows)

    def read_frames(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Frames [start, stop) decoded from disk (no cache); UndecodableFrames where they cannot be."""
        stop = self.frame_rows if stop is None else min(stop, self.frame_rows)
        try:
            return self._frames_ds[start:stop]
        except (OSError, ValueError) as e:
            raise UndecodableFrames(self.path, f"frames {start}..{stop - 1} cannot be decoded "
                                               f"({str(e).split('(')[-1].rstrip(')')[:80]})") from None

    def read_chunks(self, ids: Iterable[int]) -> dict[int, np.ndarray]:
        """Chunk id -> its frames, decoded from disk (no cache): a loader's window."""
        return {int(c): self.read_frames(int(c) * self.chunk_rows, (int(c) + 1) * self.chunk_rows) for c in ids}

    def gather(self, rows: np.ndarray, blocks: Mapping[int, np.ndarray]) -> np.ndarray:
        """Frames at `rows` from chunks already read (`read_chunks`); every row's chunk must be there."""
        return gather_frames(rows, self.chunk_rows, self.frame_shape, blocks.__getitem__)

    @property
    def cached_chunks(self) -> tuple[int, ...]:
        """Chunk ids in the LRU cache, least recently used first."""
        return tuple(self._cache)

    def load_frames(self) -> None:
        """Decompress every frame into memory (fast random access afterwards; the file may be closed)."""
        if self._frames is None:
            self._frames = self.read_frames()

    def frames(self, rows: np.ndarray) -> np.ndarray:
        """Frames at arbitrary rows (any order, repeats allowed): (*rows.shape, C, H, W)."""
        rows = np.asarray(rows)
        if self._frames is not None:
            return self._frames[rows]
        return gather_frames(rows, self.chunk_rows, self.frame_shape, self._cached_chunk)

    def _cached_chunk(self, c: int) -> np.ndarray:
        block = self._cache.pop(c, None)
        if block is None:
            block = self.read_frames(c * self.chunk_rows, (c + 1) * self.chunk_rows)
            if len(self._cache) >= self._cache_limit:
                self._cache.pop(next(iter(self._cache)))  # least recently used
        self._cache[c] = block  # (re)insert as most recently used
        return block

    # -- observations and batches --

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
    """Bytes on disk of a dataset with its part files (a build in progress)."""
    path = Path(path)
    total = path.stat().st_size if path.exists() else 0
    pdir = parts_dir(path)
    if pdir.exists():
        total += sum(p.stat().st_size for p in pdir.iterdir())
    return total
