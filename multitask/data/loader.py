"""Batches of (observation, teacher outputs) across games, prepared in background workers.

Every batch is a pure function of (seed, batch number, rank): a killed run that resumes at batch k
sees exactly the batches an uninterrupted run would have seen, and data-parallel ranks see
different data. Games are balanced whatever their dataset sizes:
- `per_game`: each batch is one game's (Rusu et al. 2016, appendix); every cycle of G batches
  visits each of the G games once, in a random order;
- `mixed`: each batch holds B/G samples of every game, grouped by game.

Where a game's frames fit its share of the memory budget they are decompressed into RAM once
(random access is then a numpy gather, bench/dataset_bench.py: ~20x faster than reading chunks).
Otherwise the game is read through a *window*: a random set of whole HDF5 chunks that fills its
budget, sampled from for `window_batches` batches, then replaced (chunk-aware shuffling: every
chunk read is decompressed once per window instead of once per sample).

Workers hand batches over in *groups*: consecutive batches packed into one observation tensor and
one teacher-output tensor. Handing a tensor to another process costs ~2 ms whatever its size (shared
memory, file descriptors, queue threads; measured: a MinAtar batch of 256 takes 0.17 ms to make
and 2.2 ms to hand over), so a group of up to GROUP_BATCHES batches and ~GROUP_BYTES pays it once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from multitask.envs.framestack import join_frames, stack_indices
from multitask.agents.networks import pad_channels
from multitask.data.reader import DatasetReader
from multitask.errors import UserError

BatchMode = Literal["per_game", "mixed"]
GROUP_BATCHES = 32  # batches per hand-over at most
GROUP_BYTES = 2 << 20  # observation bytes per hand-over (MinAtar batch of 256: 256 KB -> 8 per group; an Atari
# batch of 64, 1.8 MB, goes alone: larger groups raised the worker's peak memory from 255 to 426 MiB, measured)


class TrainBatch(NamedTuple):
    obs: torch.Tensor  # (B, C, H, W) uint8, rows grouped by game, channels zero-padded to `channels`
    groups: tuple[tuple[int, int, int], ...]  # (game index, first row, end row) per game present
    teacher: tuple[torch.Tensor, ...]  # per group: (rows, A_game) float32 raw teacher outputs
    index: int  # batch number k


class BatchGroup(NamedTuple):
    """Consecutive batches as two tensors (what a worker hands over); `unpack` gives TrainBatches."""

    obs: torch.Tensor  # (rows of all batches, C, H, W) uint8
    teacher: torch.Tensor  # (rows of all batches, max A) float32, zero beyond each game's A
    batches: tuple[tuple[int, tuple[tuple[int, int, int, int], ...]], ...]  # (k, ((game, first, end, A), ...))

    def unpack(self) -> list[TrainBatch]:
        out, row = [], 0
        for k, groups in self.batches:
            end = max(e for _, _, e, _ in groups)
            out.append(TrainBatch(self.obs[row:row + end], tuple((g, a, e) for g, a, e, _ in groups),
                                  tuple(self.teacher[row + a:row + e, :n] for _, a, e, n in groups), k))
            row += end
        return out


@dataclass(frozen=True)
class LoaderSpec:
    paths: tuple[str, ...]  # one dataset per game, in head order
    batch_size: int
    mode: BatchMode
    seed: int
    channels: int  # trunk input channels (MinAtar games have 4-10; pad to the maximum)
    memory_budget: int  # bytes of decompressed frames the loader may hold, all workers together
    workers: int = 1
    window_batches: int = 500
    rank: int = 0
    control: tuple[str, ...] = ()  # train on the steps of episodes these control policies played (empty: all)
    pin_memory: bool = False  # page-locked batches, for a copy to a GPU that overlaps the update (cuda runs)


def batch_rng(seed: int, k: int, rank: int) -> np.random.Generator:
    return np.random.default_rng([seed, k, rank, 0x5EED])


def plan(spec: LoaderSpec, k: int, num_games: int) -> list[tuple[int, int]]:
    """Batch k's (game, rows) pairs: per_game -> one game; mixed -> every game, B/G rows each."""
    if spec.mode == "per_game":
        cycle, pos = divmod(k, num_games)
        order = np.random.default_rng([spec.seed, cycle, 0xC1C1E]).permutation(num_games)
        return [(int(order[pos]), spec.batch_size)]
    base, extra = divmod(spec.batch_size, num_games)
    return [(g, base + (1 if g < extra else 0)) for g in range(num_games) if base + (g < extra) > 0]


class GameSource:
    """One game's steps: sample (obs, teacher outputs) from RAM or from a window of chunks."""

    def __init__(self, path: str, budget: int, control: tuple[str, ...] = ()):
        self.reader = DatasetReader(Path(path), cache_bytes=0)
        self.rows = played_by(self.reader, control) if control else None  # None: every step
        self.stack = self.reader.stack
        self.frame_index = self.reader.steps["frame_index"]
        self.teacher = self.reader.steps["teacher_outputs"]
        self.n = len(self.reader)
        self.frame_shape = self.reader.frame_shape  # (C, H, W)
        chunk_bytes = self.reader.chunk_rows * int(np.prod(self.frame_shape))
        self.in_memory = self.reader.frames_nbytes <= budget
        self.window_chunks = max(2, budget // max(1, chunk_bytes))
        if self.in_memory:
            self.reader.load_frames()
            self.reader.close()  # everything is in RAM now
        self._window_id = None

    def _load_window(self, window_id: int, seed: int, key: int) -> None:
        num_chunks, chunk = self.reader.num_chunks, self.reader.chunk_rows
        rng = np.random.default_rng([seed, key, window_id, 0x3A1D0])
        first = (self.frame_index - self.stack + 1) // chunk
        last = self.frame_index // chunk
        if self.rows is None:
            chosen = np.sort(rng.choice(num_chunks, size=min(self.window_chunks, num_chunks), replace=False))
        else:  # only chunks holding frames of the kept episodes: a window of others would have no row to draw
            wanted = np.unique(np.concatenate([first[self.rows], last[self.rows]]))
            chosen = np.sort(rng.choice(wanted, size=min(self.window_chunks, len(wanted)), replace=False))
        self._blocks, self._window_id = self.reader.read_chunks(chosen), window_id
        loaded = np.zeros(num_chunks, dtype=bool)
        loaded[chosen] = True
        self._eligible = np.flatnonzero(loaded[first] & loaded[last])
        if self.rows is not None:
            self._eligible = np.intersect1d(self._eligible, self.rows)

    def sample(self, rng: np.random.Generator, n: int, window: tuple[int, int, int] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """n random steps -> stacked obs (n, k*C, H, W) uint8 and teacher outputs (n, A)."""
        if self.in_memory:
            idx = rng.integers(0, self.n, n) if self.rows is None else self.rows[rng.integers(0, len(self.rows), n)]
            frames = self.reader.frames(stack_indices(self.frame_index[idx], self.stack))
        else:
            window_id, seed, key = window
            if window_id != self._window_id:
                self._load_window(window_id, seed, key)
            if len(self._eligible):
                idx = self._eligible[rng.integers(0, len(self._eligible), n)]
                frames = self.reader.gather(stack_indices(self.frame_index[idx], self.stack), self._blocks)
            else:  # no observation lies whole in the window (stacks across chunks): read its rows from disk
                pool = np.arange(self.n) if self.rows is None else self.rows
                idx = pool[rng.integers(0, len(pool), n)]
                frames = self.reader.frames(stack_indices(self.frame_index[idx], self.stack))
        return join_frames(frames), self.teacher[idx]


def played_by(reader: DatasetReader, kinds: Sequence[str]) -> np.ndarray:
    """Rows of the steps whose episode a control policy of one of `kinds` played (data/control.py)."""
    wanted = np.array([p["kind"] in kinds for p in reader.info.policies] + [False])
    ep = reader.episodes
    keep = wanted[np.minimum(ep["policy"].astype(np.int64), len(wanted) - 1)]
    starts, lengths = ep["first_step"][keep], ep["length"][keep]
    if not len(starts):
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.arange(a, a + n) for a, n in zip(starts, lengths)]).astype(np.int64)


class DistillationStream(IterableDataset):
    """Yields TrainBatch k = start, start+1, ...; worker w of W makes batches k = w (mod W)."""

    def __init__(self, spec: LoaderSpec, start: int = 0, stop: int | None = None):
        super().__init__()
        self.spec, self.start, self.stop = spec, start, stop
        self.sources: list[GameSource] | None = None

    def _open(self, workers: int) -> list[GameSource]:
        budget = self.spec.memory_budget // max(1, workers) // len(self.spec.paths)
        return [GameSource(p, budget, self.spec.control) for p in self.spec.paths]

    def make_batch(self, k: int, sources: Sequence[GameSource], workers: int = 1) -> TrainBatch:
        """Batch k. A game read through windows draws from window k // (window_batches * workers): a
        function of k, never of where iteration started, so a resumed run reads the windows an
        uninterrupted one did; each of the `workers` makes 1/workers of the batches, so each still
        draws about `window_batches` batches from one window."""
        spec = self.spec
        rng = batch_rng(spec.seed, k, spec.rank)
        obs_parts, groups, teacher, row = [], [], [], 0
        for g, n in plan(spec, k, len(sources)):
            window = (k // (spec.window_batches * max(1, workers)), spec.seed, g * 1000 + spec.rank)
            obs, q = sources[g].sample(rng, n, window)
            obs_parts.append(pad_channels(torch.from_numpy(obs), spec.channels))  # mixed batches share one shape
            teacher.append(torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32)))
            groups.append((g, row, row + n))
            row += n
        obs = obs_parts[0] if len(obs_parts) == 1 else torch.cat(obs_parts)
        return TrainBatch(obs, tuple(groups), tuple(teacher), k)

    def group_size(self, sources: Sequence[GameSource]) -> int:
        """Batches per hand-over: GROUP_BATCHES, fewer where batches are large (GROUP_BYTES)."""
        obs_bytes = self.spec.batch_size * self.spec.channels * int(np.prod(sources[0].frame_shape[1:]))
        return int(np.clip(GROUP_BYTES // max(1, obs_bytes), 1, GROUP_BATCHES))

    def groups(self, workers: int = 1, worker: int = 0) -> Iterator[BatchGroup]:
        """Groups of consecutive batches from `start`; worker w of W makes groups j = w (mod W)."""
        sources = self._open(workers)
        size = self.group_size(sources)
        first = self.start + worker * size
        while self.stop is None or first < self.stop:
            last = first + size if self.stop is None else min(first + size, self.stop)
            batches = [self.make_batch(k, sources, workers) for k in range(first, last)]
            width = max(q.shape[1] for b in batches for q in b.teacher)
            teacher = torch.zeros((sum(len(b.obs) for b in batches), width), dtype=torch.float32)
            row, meta = 0, []
            for b in batches:
                for (g, a, e), q in zip(b.groups, b.teacher):
                    teacher[row + a:row + e, :q.shape[1]] = q
                meta.append((b.index, tuple((g, a, e, q.shape[1]) for (g, a, e), q in zip(b.groups, b.teacher))))
                row += len(b.obs)
            obs = batches[0].obs if len(batches) == 1 else torch.cat([b.obs for b in batches])
            yield BatchGroup(obs, teacher, tuple(meta))
            first += workers * size

    def __iter__(self) -> Iterator[BatchGroup]:
        info = get_worker_info()
        w, W = (info.id, info.num_workers) if info else (0, 1)
        return self.groups(W, w)


class BatchLoader:
    """Iterator over TrainBatch k = start, start+1, ...; `close()` stops the background workers."""

    def __init__(self, spec: LoaderSpec, start: int = 0, stop: int | None = None):
        stream = DistillationStream(spec, start, stop)
        self._loader = None
        if spec.workers <= 0:
            self._groups = stream.groups()
        else:
            self._loader = DataLoader(stream, batch_size=None, num_workers=spec.workers, prefetch_factor=2,
                                      pin_memory=spec.pin_memory, multiprocessing_context="fork")
            self._groups = iter(self._loader)
        self._ready: list[TrainBatch] = []

    def __iter__(self) -> "BatchLoader":
        return self

    def __next__(self) -> TrainBatch:
        if not self._ready:
            try:
                group = next(self._groups)
            except UserError as e:  # from a worker, its message holds the worker's traceback: keep the sentence
                raise UserError(str(e).rsplit(f"{UserError.__module__}.UserError: ", 1)[-1].strip()) from None
            self._ready = group.unpack()[::-1]
        return self._ready.pop()

    def close(self) -> None:
        shutdown = getattr(self._groups, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self._groups = iter(())
        self._ready = []


def make_loader(spec: LoaderSpec, start: int = 0, stop: int | None = None) -> BatchLoader:
    """Batches start, start+1, ... in order; prepared by `spec.workers` background processes."""
    return BatchLoader(spec, start, stop)
