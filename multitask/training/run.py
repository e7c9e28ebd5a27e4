"""The run folder every trainer writes, and the bookkeeping all trainers share.

    <run folder>/config.toml    the config as built (fields a preset derives are filled in)
                 state.pt       resumable training state, rewritten atomically at each checkpoint
                 metrics.jsonl  a JSON line per `log`: {<step metric>: step, <metric>: value, ...}
                 wandb/         the W&B run (offline by default; see tracking.py)
                 best.pt ...    agent checkpoints and their .json cards (agents/checkpoints.py)

A trainer keeps what it learns in one object (`Resumable`: its step, state_dict, load_state_dict),
makes a `Run`, has the run `resume` that object from state.pt, opens the outputs (`start`), then
`log`s, `save_state`s and `save_agent`s as it goes, and `finish`es. Started again with the same
command, a killed run resumes: its config and identity (what the run is of beyond the config: a
game, a network, a process count) must match, except keys the trainer names (a longer budget, more
threads). Wall-clock and CPU seconds count across resumes (`clock`). Under torchrun every rank
makes the same calls and only the writer (rank 0) writes.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import torch
from torch import nn

from multitask import config as configlib
from multitask.agents.checkpoints import save_agent, weights_problem
from multitask.errors import UserError
from multitask.files import atomic_torch_save, atomic_write_text, check_writable
from multitask.training.distributed import barrier
from multitask.training.tracking import Tracker, WandbMode


def _flat(d: dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in d.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield prefix + key, value


def config_differences(saved: dict, current: dict, may_differ: Sequence[str] = ()) -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) for every key whose values differ, nested tables compared
    key by key under dotted names, in the current dict's order (then keys only `saved` has); keys
    in `may_differ` are skipped. A key missing on one side counts as None there."""
    s, c = dict(_flat(saved)), dict(_flat(current))
    keys = [*c, *(k for k in s if k not in c)]
    return [(k, s.get(k), c.get(k)) for k in keys if k not in may_differ and s.get(k) != c.get(k)]


def added_at_defaults(config: Any, saved: dict, prefix: str = "") -> list[str]:
    """Dotted keys of `config` (a dataclass, nested ones searched too) that a saved config lacks and
    that hold their defaults (or the value such runs were built with, where the option names one:
    config.option's `absent`): keys added to the config or spec since the run was saved, which do not
    make it another run (e.g. TrunkSpec.shape, added after the first multi-task DQN runs began)."""
    out = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name not in saved:
            expected = f.metadata.get("absent", f.default)
            if expected is not dataclasses.MISSING and value == expected:
                out.append(prefix + f.name)
        elif dataclasses.is_dataclass(value) and isinstance(saved[f.name], dict):
            out += added_at_defaults(value, saved[f.name], f"{prefix}{f.name}.")
    return out


# Keys a finished run may differ in and still be the run asked for: how it ran, or what it filled in
# as built (a preset's width and extra FC layers, a default name).
AS_BUILT = ("device", "channels_last", "num_threads", "eval_workers", "loader_workers", "width", "extra_fc", "name")


def finished_with(run_dir: Path, config: Any) -> tuple[bool, list[tuple[str, Any, Any]]]:
    """Whether `run_dir` holds a finished run (summary.json), and how its saved config differs from
    `config` (the resume rule: AS_BUILT keys and keys added since at their defaults do not count).
    A finished run with no differences is this config's and may be reused."""
    summary = run_dir / "summary.json"
    try:
        saved = json.loads(summary.read_text()).get("config", {})
    except (OSError, ValueError):
        return False, []
    return True, config_differences(saved, configlib.to_dict(config), [*AS_BUILT, *added_at_defaults(config, saved)])


def default_run_name(games: Sequence[str], method: str, size: str, seed: int, shape: str = "") -> str:
    """A run's default folder name: `<suite>-<Game>[-<Game>]-<method>-<size>[-<shape>]-s<seed>`,
    games counted (`5games`) beyond two; e.g. `minatar-Breakout-kl-25pct-s0`,
    `minatar-Seaquest-kl-7pct-strided-s1`."""
    names = "-".join(g.split("/")[1] for g in games) if len(games) <= 2 else f"{len(games)}games"
    shape = f"-{shape}" if shape else ""
    return f"{games[0].split('/')[0]}-{names}-{method}-{size.replace('%', 'pct')}{shape}-s{seed}"


class Clock:
    """Wall-clock and CPU seconds of a run, the runs it resumed included. CPU time is this
    process's, all threads (evaluation worker processes are not counted)."""

    def __init__(self, wall_before: float = 0.0, cpu_before: float = 0.0):
        self._wall0 = time.perf_counter() - wall_before
        self._cpu0 = time.process_time() - cpu_before

    def wall(self) -> float:
        return time.perf_counter() - self._wall0

    def cpu(self) -> float:
        return time.process_time() - self._cpu0

    def state(self) -> dict[str, float]:
        return {"wall_time_s": self.wall(), "cpu_time_s": self.cpu()}


class Every:
    """True once each time a growing step count reaches the next multiple of `period` (never for
    period 0). Made at a resumed step, it continues the schedule a straight run would have had."""

    def __init__(self, period: int, start: int = 0):
        self.period = period
        self.next = (start // period + 1) * period if period > 0 else None

    def __call__(self, step: int) -> bool:
        if self.next is None or step < self.next:
            return False
        self.next = (step // self.period + 1) * self.period
        return True


class Rate:
    """Units per second of a growing count, between one reading and the next."""

    def __init__(self, count: int = 0):
        self.count, self.time = count, time.perf_counter()

    def __call__(self, count: int) -> float:
        now = time.perf_counter()
        rate = (count - self.count) / max(now - self.time, 1e-9)
        self.count, self.time = count, now
        return rate


class Resumable(Protocol):
    """A trainer's learning state: how far it is (in the run's step metric) and what state.pt holds."""

    @property
    def step(self) -> int: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, saved: dict[str, Any]) -> None: ...


def _as_dict(obj: Any) -> dict:
    return obj.to_dict() if hasattr(obj, "to_dict") else dataclasses.asdict(obj)


DIVERGED_ADVICE = ("lower the learning rate (or change what made it diverge) and pass --restart (a resume would "
                   "replay the same updates)")

# What a run writes besides config.toml and wandb/ (a restarted run starts a new W&B run beside the old)
RUN_OUTPUTS = ("state.pt", "metrics.jsonl", "best.pt", "best.json", "last.pt", "last.json", "summary.json", "table.md")


class Run:
    """One training run's folder and all it writes there (on the writer process only)."""

    def __init__(self, folder: Path, config: Any, step_metric: str, identity: dict[str, Any] | None = None,
                 writer: bool = True):
        self.folder = Path(folder)
        self.config = config  # the config dataclass as built
        self.config_dict = configlib.to_dict(config)
        # Identity values may be dataclasses (a NetworkSpec): saved as dicts, kept as objects so that
        # fields added to them since a run was saved are recognised at their defaults on resume.
        self._identity_objects = {k: v for k, v in (identity or {}).items() if dataclasses.is_dataclass(v)}
        self.identity = {k: _as_dict(v) if k in self._identity_objects else v for k, v in (identity or {}).items()}
        self.step_metric = step_metric  # the x-axis of metrics.jsonl and W&B: env_steps, updates, ...
        self.writer = writer
        self.state_path = self.folder / "state.pt"
        self.resumes = 0
        self.clock = Clock()
        self._times_before = (0.0, 0.0)
        self._wandb_id: str | None = None
        self._tracker: Tracker | None = None
        self._metrics = None

    # ---- before training ------------------------------------------------------------------------

    def resume(self, learning: Resumable, restart: bool, may_differ: Sequence[str] = (),
               budget: tuple[str, int, int] | None = None) -> bool:
        """Load state.pt into `learning` and say so; False (nothing loaded) when there is none or
        `restart` discards it.

        Refused with one sentence when the saved run differs in config or identity, except in the
        keys `may_differ` names, or when it has gone past `budget` = (key, value, stride): the
        config's budget key, its value, and the steps the trainer takes at a time (a budget that is
        not a multiple of them ends up to one stride past it)."""
        if self.writer:  # before any work: a run that cannot write its folder would be lost at its first checkpoint
            check_writable(self.folder / "config.toml", "a writable --run-dir")
            hold_folder(self.folder)  # and no other process may write it meanwhile
        if restart and self.writer:  # the old run's outputs go with it: none may pass for the new run's
            for name in RUN_OUTPUTS:
                (self.folder / name).unlink(missing_ok=True)
        barrier()  # no process reads a state.pt that the writer is removing
        if not self.state_path.exists():
            return False
        saved = self._read_state()
        saved_config = saved.get("config", {})
        known = [k for k in self.identity if k in saved]  # identity keys added since an older run was saved go unchecked
        differences = config_differences({**saved_config, **{k: saved[k] for k in known}},
                                         {**self.config_dict, **{k: self.identity[k] for k in known}},
                                         [*may_differ, *added_at_defaults(self.config, saved_config),
                                          *(key for k, obj in self._identity_objects.items()
                                            for key in added_at_defaults(obj, saved.get(k) or {}, f"{k}."))])
        if differences:
            shown = "; ".join(f"{k} {_short(a)} then, {_short(b)} now" for k, a, b in differences[:3])
            more = f" and {len(differences) - 3} more" if len(differences) > 3 else ""
            raise UserError(f"run folder {self.folder} holds a run with other settings ({shown}{more}); rerun "
                            f"with its settings to resume it, or pass --restart or another --run-dir to start over")
        learning.load_state_dict(saved)
        if budget is not None and learning.step >= budget[1] + budget[2]:
            key, value, _ = budget
            raise UserError(f"run folder {self.folder} has trained {learning.step:,} {self.step_metric.replace('_', ' ')}, "
                            f"past {key}={value:,}; pass {key}={learning.step:,} or more to resume it, or --restart "
                            f"to start over")
        self.resumes = saved.get("resumes", 0) + 1
        self._resumed_step = learning.step
        self._times_before = (saved.get("wall_time_s", 0.0), saved.get("cpu_time_s", 0.0))
        self._wandb_id = saved.get("wandb_id")
        self.say(f"resuming {self.folder} after {learning.step:,} {self.step_metric.replace('_', ' ')}")
        return True

    def _read_state(self) -> dict:
        try:
            return torch.load(self.state_path, map_location="cpu", weights_only=True)
        except Exception as e:  # a torn file cannot happen (atomic writes) but a foreign one can
            raise UserError(f"cannot read training checkpoint {self.state_path} ({type(e).__name__}); "
                            f"pass --restart to start over") from None

    def start(self, wandb_mode: WandbMode, name: str, job_type: str, group: str,
              extra_config: dict[str, Any] | None = None) -> None:
        """Write config.toml, open metrics.jsonl (appended to on a resume, else new) and the W&B run (the
        same one on a resume; `extra_config` joins the config there), and start the clock."""
        if self.writer:
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.folder / "config.toml", configlib.to_toml(self.config))
            # a fresh run starts the curve afresh (a run killed before its first checkpoint left lines);
            # a resumed one keeps only what its checkpoint had seen, so no step is logged twice
            if self.resumes:
                trim_metrics(self.folder / "metrics.jsonl", self.step_metric, self._resumed_step)
            self._metrics = open(self.folder / "metrics.jsonl", "a" if self.resumes else "w")
        self._tracker = Tracker(wandb_mode if self.writer else "off", self.folder, name=name, job_type=job_type,
                                config={**self.config_dict, **(extra_config or {})}, step_metric=self.step_metric,
                                run_id=self._wandb_id, group=group)
        self.clock = Clock(*self._times_before)

    # ---- while training -------------------------------------------------------------------------

    def log(self, metrics: dict[str, float], step: int) -> None:
        """One point of every metric at `step`, to metrics.jsonl and W&B alike. A training loss that
        is NaN or infinite ends the run here, in one sentence (it diverged: training on would only
        carry NaN weights to the final evaluation); state.pt keeps the last checkpoint before it."""
        if self.writer:
            self._tracker.log(metrics, step)
            self._metrics.write(json.dumps({self.step_metric: step, **finite_or_null(metrics)}) + "\n")
            self._metrics.flush()
        diverged = [k for k, v in metrics.items() if k.endswith("/loss") and not math.isfinite(v)]
        if diverged:
            raise UserError(f"training diverged: {diverged[0]} is {metrics[diverged[0]]} at "
                            f"{self.step_metric.rstrip('s').replace('_', ' ')} {step:,}; {DIVERGED_ADVICE}")

    def report_evaluation(self, metrics: dict[str, float], line: str, step: int) -> None:
        """A periodic evaluation: its metrics logged at `step` and one console line
        (`eval at update 5,000: <line>`, `eval at env step 250,000: <line>`)."""
        self.log(metrics, step)
        self.say(f"eval at {self.step_metric.rstrip('s').replace('_', ' ')} {step:,}: {line}")

    def say(self, line: str) -> None:
        """One line to stderr, on a line of its own even while a progress bar is drawn there."""
        if self.writer:
            print(("\r\033[K" if sys.stderr.isatty() else "") + line, file=sys.stderr, flush=True)

    def save_state(self, learning: Resumable) -> None:
        """state.pt: `learning`'s state dict plus what `resume` reads back; every process waits
        until it is written."""
        if self.writer:
            run_id = self._tracker.run_id if self._tracker else self._wandb_id
            atomic_torch_save({**learning.state_dict(), "config": self.config_dict, **self.identity,
                               "resumes": self.resumes, "wandb_id": run_id, **self.clock.state()}, self.state_path)
        barrier()

    def save_agent(self, name: str, net: nn.Module, kind: str, card: dict[str, Any]) -> str | None:
        """<folder>/<name>.pt and its card; the file's sha256. Weights no trained network holds (NaN,
        or beyond checkpoints.MAX_ABS_WEIGHT) end the run instead: it diverged, and the file would only
        be refused when loaded, as corrupt."""
        problem = weights_problem(net.state_dict())
        if problem:
            raise UserError(f"training diverged: the network holds {problem}; {DIVERGED_ADVICE}")
        return save_agent(self.folder / f"{name}.pt", net, kind, card) if self.writer else None

    def write_text(self, name: str, text: str) -> None:
        if self.writer:
            atomic_write_text(self.folder / name, text)

    # ---- after training -------------------------------------------------------------------------

    def finish(self, summary: dict[str, Any]) -> None:
        """Put `summary` on the W&B run and close the outputs."""
        if self._tracker is not None:
            self._tracker.summary(summary)
            self._tracker.finish()
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self.writer:
            release_folder(self.folder)


_HELD: dict[str, int] = {}  # run folder -> the open lock file whose lock this process holds
LOCK_FILE = ".run.lock"


def hold_folder(folder: Path) -> None:
    """Lock a run folder for this process: a POSIX lock on <folder>/.run.lock, which the kernel drops
    when the process ends, however it ends, and which the processes it forks (loader workers) do not
    inherit, so a killed run's lingering workers do not keep it. Two processes writing one run's
    state.pt, metrics.jsonl and checkpoints would interleave them; the second is refused. Holding it
    again from the same process is a no-op (trainers called in turn, tests)."""
    key = str(Path(folder).resolve())
    if key in _HELD:
        return
    fd = os.open(Path(key) / LOCK_FILE, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # EACCES or EAGAIN: held by another process
        os.close(fd)
        raise UserError(f"run folder {folder} is in use by another process (the same command still running?); "
                        f"wait for it to end, or pass another --run-dir") from None
    _HELD[key] = fd


def release_folder(folder: Path) -> None:
    fd = _HELD.pop(str(Path(folder).resolve()), None)
    if fd is not None:
        os.close(fd)


def finite_or_null(metrics: dict[str, Any]) -> dict[str, Any]:
    """NaN and infinities as null: JSON has no such numbers (json.dumps would write a bare NaN that
    strict readers refuse)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}


def trim_metrics(path: Path, step_metric: str, step: int) -> None:
    """Keep the lines of metrics.jsonl up to `step` (the checkpoint a run resumes from), dropping
    those logged after it by the interrupted run and any final-evaluation lines (`final/...`, a
    teacher's `eval/<game>/final_score`): the resumed run logs them again. Written atomically."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line torn by the kill
            continue
        if row.get(step_metric, 0) <= step and not any(k.startswith("final/") or k.endswith("/final_score")
                                                       for k in row):
            kept.append(line)
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
