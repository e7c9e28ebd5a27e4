"""`DatasetConfig`: every setting of `multitask dataset build`, each default in one place with its source.

Layered like the other configs (`multitask.config`): defaults <- `--config F.toml` <- `key=value`
overrides <- the command's flags (`--steps`, `--epsilon`, ...), which the CLI reads from here for
their defaults and help. `resolved` fills the per-game defaults (envs per suite, flush size per
step size); the resolved config is what a build records in the dataset's `builds` entry.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

from multitask import config as configlib
from multitask.config import option
from multitask.data.control import check_spec as check_control
from multitask.data.processes import shared_counters_supported
from multitask.devices import pick_device
from multitask.data.schema import Compression, bytes_per_step
from multitask.envs import GameSpec
from multitask.errors import UserError

# Envs in all lanes, per suite. MinAtar: 128 envs per lane amortise the per-vector-step Python work
# (200k Breakout steps on one core: 6.9 s with 32 envs, 5.0 s with 128; measured). Atari: 16 per
# lane, because the teacher's one-thread forward pass costs less per observation in batches of 16
# than of 8 (2,500 vs 1,900 per second; measured).
SUITE_NUM_ENVS = {"atari": 32, "minatar": 256}


@dataclass(frozen=True)
class DatasetConfig:
    steps: int | None = option(None, "steps the dataset holds when the build ends; no default (required): "
                                     "the experiment's choice")
    epsilon: float = option(0.05, "epsilon of the epsilon-greedy control policy (Rusu et al. 2016: 0.05)")
    control: str = option("teacher", "who plays: teacher, student:<checkpoint> (teacher-labelled student play, "
                                     "DAgger-style) or mixture:<checkpoint>:<p> (the teacher's action with probability p)")
    seed: int = option(0, "env stream i is seeded seed + i; each resume adds 7919, so it plays fresh streams")
    num_envs: int = option(0, "envs in all lanes together; 0: per suite, " +
                           ", ".join(f"{n} {s}" for s, n in SUITE_NUM_ENVS.items()) +
                           " (measured: MinAtar 200k steps in 5.0 s with 128 envs a lane vs 6.9 s with 32; "
                           "Atari's forward pass is cheapest per observation in batches of 16)")
    device: Literal["auto", "cpu", "cuda"] = option("auto", "where the teacher's forward passes run; auto: cuda when "
                                                    "torch sees a GPU")
    inference: Literal["auto", "lanes", "server"] = option(
        "auto", "who runs the teacher's forward passes: lanes (each lane's process, the teacher copied into each; on a "
                "GPU then one lane, since a forked helper cannot use the parent's CUDA context) or server (one spawned "
                "process for every lane, data/inference.py; x86-64 Linux); auto: server on a GPU with more than one lane, "
                "else lanes, as on a CPU "
                "(where the lanes' own forward passes keep the cores busy; data/lanes.py)")
    lanes: int = option(2, "env groups, each played by the teacher in its own process, about one per core "
                           "(2: the 2-core dev machine; 1 plays in this process alone; --games builds use 1 each)")
    workers: int = option(2, "processes building several games at once (--games), one per core of the "
                             "2-core dev machine")
    flush_steps: int = option(0, "completed steps buffered before a flush to disk; 0: as many as fill flush_bytes")
    flush_bytes: int = option(32 << 20, "bytes of completed steps per flush when flush_steps is 0 (~75,000 MinAtar "
                                        "or ~4,700 Atari steps): every flush costs a part file and a master whatever "
                                        "its size (MinAtar: 0.58 CPU-s per 200k steps in 3 flushes vs 1.11 in 10; "
                                        "measured), and a crash loses at most what is pending")
    flush_seconds: float = option(60.0, "completed episodes are also flushed this often, so a crash loses at most "
                                        "about a minute of play")
    compression: Literal["gzip", "lzf", "none"] = option("gzip", "frame compression of the final file (measured on "
                                                         "80k Atari frames: lzf 28x, gzip-1 38x; in every HDF5 build, "
                                                         "so plain h5py reads it)")
    level: int = option(1, "gzip level for frames (measured on Atari frames: gzip-1 38x, gzip-4 52x smaller)")
    frame_chunk: int = option(64, "frames per HDF5 chunk, decompressed whole on read (bench/dataset_bench.py "
                                  "sweeps chunks of 16, 64 and 256)")
    step_chunk: int = option(16384, "rows per HDF5 chunk of the per-step and per-episode arrays (read whole on open)")

    def __post_init__(self):
        check_control(self.control)
        if self.steps is not None and self.steps < 1:
            raise ValueError("steps must be positive")
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError("epsilon must be in [0, 1]")
        if min(self.num_envs, self.flush_steps) < 0 or min(self.lanes, self.workers, self.flush_bytes) < 1:
            raise ValueError("num_envs and flush_steps must be 0 (the default) or positive; lanes, workers "
                             "and flush_bytes positive")
        if min(self.frame_chunk, self.step_chunk) < 1 or not 0 <= self.level <= 9:
            raise ValueError("frame_chunk and step_chunk must be positive and level within 0..9")

    def compression_settings(self) -> Compression:
        """The HDF5 filters and chunk rows of a new file."""
        return Compression(frames=self.compression, level=self.level, frame_chunk=self.frame_chunk,
                           step_chunk=self.step_chunk)

    def resolved(self, game: GameSpec) -> "DatasetConfig":
        """This config with its per-game defaults filled in (what a build of `game` uses)."""
        if self.steps is None:
            raise UserError("give the dataset's size: --steps N (or steps=N)")
        num_envs = self.num_envs or SUITE_NUM_ENVS[game.suite]
        device = pick_device(self.device).type
        inference = self.inference
        if inference == "auto":
            # one lane gains nothing from a server: its forward passes and env steps take turns anyway
            inference = "server" if device == "cuda" and self.lanes > 1 and shared_counters_supported() else "lanes"
        if inference == "server" and not shared_counters_supported():
            raise UserError("inference = server needs x86-64 Linux; use inference=lanes")
        lanes = 1 if device == "cuda" and inference == "lanes" else min(self.lanes, num_envs)
        return dataclasses.replace(
            self, num_envs=num_envs, lanes=lanes, device=device, inference=inference,
            flush_steps=self.flush_steps or max(1, self.flush_bytes // bytes_per_step(game.frame_shape, game.num_actions)))


def load_config(path: Path | None = None, overrides: Sequence[str] = (), **flags) -> DatasetConfig:
    """Defaults <- the TOML at `path` <- `key=value` overrides <- flags that are not None."""
    cfg = configlib.load(DatasetConfig, path, overrides)
    try:
        return dataclasses.replace(cfg, **{k: v for k, v in flags.items() if v is not None})
    except ValueError as e:
        raise UserError(f"invalid dataset build settings: {e}") from None
