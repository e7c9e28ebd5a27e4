"""`multitask student sweep`: a grid of single-game students and its results table.

A sweep is one TOML file (configs/sweeps/*.toml): a base student config, the games (one
single-game student each), and the losses, sizes and seeds to cross. Runs live in
runs/student/<run name>/, so sweeps that share a cell (the KL, 100% student is in both the loss and
the size sweep) share its run. Finished runs (with a summary.json) of the same config are skipped,
so a killed sweep continues where it stopped (a finished run of another config under the same name is
refused, never mixed in); unfinished runs resume from their checkpoints. Several processes may
work on the same sweeps at once: each claims a run with a lock file (`.lock`, holding its pid; a
dead holder's lock is taken over), and the table is written once every run has finished. The
table goes to results/<name>.md and the raw summaries to results/<name>.json.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

from multitask import config as configlib
from multitask.files import atomic_write_text
from multitask.config import option
from multitask.data.schema import dataset_path
from multitask.envs import get_game
from multitask.errors import UserError
from multitask.agents.sizes import SizePreset
from multitask.training.losses import LossName
from multitask.evaluation.report import sweep_columns, sweep_table
from multitask.training.run import finished_with
from multitask.training.student import StudentConfig, train_student
from multitask.training.tracking import WandbMode


@dataclass(frozen=True)
class SweepConfig:
    name: str = option("", "sweep name: the table goes to results/<name>.md and .json (each run to runs/student/<its run name>/)")
    base: str = option("", "base student config (TOML) that every run starts from")
    games: tuple[str, ...] = option((), "one single-game student per game")
    losses: tuple[LossName, ...] = option(("kl",), "losses to compare")
    sizes: tuple[SizePreset, ...] = option(("100%",), "student sizes to compare")
    taus: tuple[float, ...] = option((), "KL temperatures to compare (empty: the base config's)")
    seeds: tuple[int, ...] = option((0,), "seeds per cell (the table averages them)")
    overrides: tuple[str, ...] = option((), "key=value applied to every run after the base config")
    datasets_dir: str = option("", "folder holding one <Game>.h5 per game, used instead of the students' default "
                                    "datasets/<suite>/ (e.g. aggregated DAgger datasets)")

    def __post_init__(self):
        if not self.name or not self.base or not self.games:
            raise ValueError("a sweep needs name, base and games")
        if sum(len(v) > 1 for v in (self.losses, self.sizes, self.taus)) > 1:
            raise ValueError("vary one of losses, sizes and taus in one sweep, so that it makes one table")


def run_sweep(path: Path, overrides: list[str], wandb_mode: WandbMode, show_progress: bool) -> str:
    sweep = configlib.load(SweepConfig, path, overrides)
    cells = cell_configs(sweep, configlib.read_toml(Path(sweep.base)))
    run_dirs = []
    for i, cfg in enumerate(cells):
        run_dir = Path("runs") / "student" / cfg.run_name
        run_dirs.append(run_dir)
        finished, differences = finished_with(run_dir, cfg)
        if finished and differences:
            key, saved, now = differences[0]
            raise UserError(f"{run_dir} is finished with another config ({key}: {saved!r} there, {now!r} here); "
                            f"remove it or give this sweep's runs other names")
        if finished:
            print(f"[{i + 1}/{len(cells)}] {cfg.run_name} (done)", file=sys.stderr)
            continue
        if not _claim(run_dir):
            print(f"[{i + 1}/{len(cells)}] {cfg.run_name} (another process is on it)", file=sys.stderr)
            continue
        try:
            print(f"[{i + 1}/{len(cells)}] {cfg.run_name}", file=sys.stderr)
            train_student(cfg, run_dir, wandb_mode=wandb_mode, show_progress=show_progress)
        finally:
            (run_dir / ".lock").unlink(missing_ok=True)
    while not all((d / "summary.json").exists() for d in run_dirs):  # runs other processes hold
        if not any(_held_by_live_process(d) for d in run_dirs if not (d / "summary.json").exists()):
            raise UserError(f"sweep {sweep.name}: some runs neither finished nor are running; run the sweep again")
        time.sleep(5)
    summaries = [json.loads((d / "summary.json").read_text()) for d in run_dirs]
    table = sweep_table(summaries, *sweep_columns(summaries))
    out = Path("results") / f"{sweep.name}.md"
    atomic_write_text(out, f"<!-- made by: multitask student sweep {path} -->\n{table}\n")
    atomic_write_text(out.with_suffix(".json"), json.dumps(summaries, indent=2) + "\n")
    print(table)
    print(f"sweep {sweep.name}: {len(summaries)} runs -> {out}")
    return table


def cell_configs(sweep: SweepConfig, base: dict) -> list[StudentConfig]:
    """One student config per cell of games x losses x sizes x taus x seeds, in that order: the base
    config, then the cell's keys, then the sweep's overrides."""
    taus = [[f"tau={t!r}"] for t in sweep.taus] or [[]]
    configs = []
    for game, loss, size, tau, seed in itertools.product(sweep.games, sweep.losses, sweep.sizes, taus, sweep.seeds):
        dataset = [f"datasets={dataset_path(get_game(game), sweep.datasets_dir)}"] if sweep.datasets_dir else []
        configs.append(configlib.load(StudentConfig, None, [f"games={game}", f"loss={loss}", f"size={size}", *tau,
                                                            f"seed={seed}", *dataset, *sweep.overrides], data=base))
    if not configs:
        raise UserError(f"sweep {sweep.name} has no runs: games, losses, sizes and seeds each need a value")
    # before any training: two cells in one run folder would be one run counted twice (a seed or game
    # listed twice) or a run refused as "finished with another config" once the first has trained
    # (taus crossed with nll or mse, whose run names do not show tau; a `name` override)
    first: dict[str, StudentConfig] = {}
    for cfg in configs:
        other = first.setdefault(cfg.run_name, cfg)
        if other is not cfg:
            differ = [f.name for f in fields(cfg) if getattr(cfg, f.name) != getattr(other, f.name)]
            how = f"that differ in {', '.join(differ)}" if differ else "(a value listed twice)"
            raise UserError(f"sweep {sweep.name} makes two runs named {cfg.run_name} {how}; list each value once and "
                            f"vary only what run names show (tau: KL only; no `name` override)")
    return configs


def _held_by_live_process(run_dir: Path) -> bool:
    try:
        pid = int((run_dir / ".lock").read_text())
    except (OSError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _claim(run_dir: Path) -> bool:
    """Take the run's lock (O_EXCL create); a lock whose process is gone is taken over."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / ".lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if _held_by_live_process(run_dir):
                return False
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False
