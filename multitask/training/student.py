"""`multitask student train`: offline policy distillation into one multi-head student.

Reads top to bottom: resolve datasets and teachers -> size the student -> resume -> distributed
set-up -> (batch, loss per game, update, log, evaluate, checkpoint)* -> final evaluation of best.pt
and summary. Runs under `torchrun --nproc-per-node K` with DistributedDataParallel (NCCL on GPUs,
gloo on CPUs); rank 0 evaluates, logs and writes.

Run folder (`runs/student/<name>/`, the shared one of `multitask.training.run`): config.toml,
state.pt (resume), best.pt / last.pt (agent checkpoints for `multitask evaluate`, with .json
cards), metrics.jsonl, summary.json, table.md, wandb/.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch

from multitask import config as configlib
from multitask.agents.checkpoints import load_agent
from multitask.agents.networks import MultiHeadNet, NetworkSpec, shape_tag
from multitask.agents.sizes import SizePreset, preset_shape, sized_network
from multitask.config import option
from multitask.data.control import KINDS as CONTROL_KINDS
from multitask.data.loader import LoaderSpec, TrainBatch, make_loader, played_by
from multitask.envs import GameSpec, get_game
from multitask.errors import UserError
from multitask.evaluation.report import run_table
from multitask.progress import Progress
from multitask.data.reader import DatasetReader, has_teacher_outputs
from multitask.data.verify import verify_invariants
from multitask.data.schema import dataset_path
from multitask.devices import CHANNELS_LAST_DOC, DEVICE_DOC, PRECISION_DOC, DeviceName, Precision, arrange, autocast
from multitask.training.distributed import Processes, average, checksum, gather, replicate, start_processes, stop
from multitask.training.losses import DEFAULT_TAU, LossName, distillation_loss, normalised_loss
from multitask.training.run import Every, Rate, Run, default_run_name
from multitask.training.scoring import (FINAL_EVAL_SEED, PERIODIC_EVAL_SEED, Scores, measured_teacher_scores,
                                        score_games, teacher_card_scores, teacher_files, teacher_paths)
from multitask.training.tracking import WandbMode

# A killed run may be resumed with these changed. width and extra_fc are left to the network
# check (the run's identity: the architecture built), which any change that matters fails; so a run
# saved before configs held the built width (a preset's width 1.0) resumes too.
LOSS_NORM_RATE = 0.01  # loss_norm: a running mean over ~100 of a game's batches (our choice; one game's loss moves slowly)
RESUMABLE_CHANGES = ("updates", "num_threads", "eval_workers", "width", "extra_fc", "device", "precision", "channels_last")


@dataclass(frozen=True)
class StudentConfig:
    games: tuple[str, ...] = option((), "games to distil, one head each (one game = single-game distillation)")
    datasets: tuple[str, ...] = option((), "one dataset per game (default: datasets/<suite>/<Game>.h5)")
    teachers: tuple[str, ...] = option((), "teacher per game, for % of teacher (default: teachers/<suite>/<Game>.pt)")
    name: str = option("", "run name (default: derived from games, loss and size)")
    tag: str = option("", "added to the default run name before the seed, for runs whose other settings the name "
                          "does not show (e.g. `20k` updates), so that they get their own folders")
    seed: int = option(0, "seeds the student's initialisation and every batch (batch k = f(seed, k, rank))")
    loss: LossName = option("kl", "kl (Rusu et al. 2016's best), nll on the teacher's greedy action, or mse on Q-values")
    tau: float = option(DEFAULT_TAU, "teacher-side softmax temperature for kl (Rusu et al. 2016: 0.01, the best of 1, 0.1, 0.01, 0.001)")
    batch_mode: Literal["per_game", "mixed"] = option("per_game", "per_game: each batch one game (paper A's appendix); mixed: B/G rows of every game")
    batch_size: int = option(256, "rows per batch and process (paper A: not stated)")
    loss_norm: bool = option(False, "divide each game's loss by a running mean of its own values (losses.normalised_loss; "
                                    "not in paper A, which weighs each game's loss the same)")
    optimizer: Literal["rmsprop", "adam"] = option("rmsprop", "paper A used RMSProp")
    lr: float = option(1e-4, "learning rate (paper A: between 1e-4 and 1e-3)")
    lr_schedule: Literal["constant", "cosine"] = option("constant", "constant, or cosine decay to 0 over `updates` (paper A: not stated)")
    updates: int = option(20_000, "gradient updates")
    size: SizePreset = option("100%", "student size relative to a teacher's parameters; multitask = ~4x plus one FC layer")
    width: float = option(1.0, "trunk width multiplier for size = custom; a run's saved config holds the width its preset built")
    extra_fc: int = option(0, "extra hidden FC layers for size = custom; a run's saved config holds what its preset built")
    shape: Literal["preset", "uniform", "strided", "flat"] = option(
        "preset", "trunk shape: uniform (the teacher's, width-scaled), strided (MinAtar: a 2x2 stride-2 conv after the "
                  "teacher's: FC input 256, not 1,024), flat (Atari: every conv as wide as the first, paper A's 16/16/16 "
                  "at conv_width 0.5), or preset: the size preset's (sizes.PRESET_SHAPES: strided with conv_width 1 for "
                  "MinAtar, flat with 0.5 for Atari, at 7% and 4%; else uniform); saved configs hold the shape built",
        absent="uniform")  # runs saved before the key existed were uniform
    conv_width: float = option(0.0, "conv channel multiplier, kept while a size preset scales the FC (0: follow the "
                                    "width); shape = strided with conv_width = 1 keeps the teacher's 16 channels")
    eval_every: int = option(5_000, "updates between evaluations of every game (0: only at the end)")
    eval_episodes: int = option(10, "episodes per game in periodic evaluations")
    final_eval_episodes: int = option(100, "episodes per game in the final evaluation of best.pt and of the teachers")
    eval_workers: int = option(2, "processes evaluating games in parallel")
    checkpoint_every: int = option(2_000, "updates between resumable checkpoints")
    log_every: int = option(500, "updates between metric logs")
    memory_budget_mb: int = option(4096, "decompressed frames the loader may hold in RAM, all workers together")
    loader_workers: int = option(1, "background processes preparing batches (0: in the training process)")
    window_batches: int = option(500, "batches drawn from one window of chunks when a dataset exceeds its budget")
    num_threads: int = option(0, "torch CPU threads per process (0: torch's default)")
    device: DeviceName = option("auto", DEVICE_DOC + "; under torchrun, process k takes cuda:k")
    precision: Precision = option("fp32", PRECISION_DOC)
    channels_last: bool = option(False, CHANNELS_LAST_DOC)
    control: tuple[str, ...] = option((), "train only on episodes these control policies played (teacher, student, "
                                          "mixture; `dataset info` lists a file's); empty: every episode")

    def __post_init__(self):
        if not self.games:
            raise ValueError("name at least one game in `games`")
        if len(set(self.games)) != len(self.games):
            raise ValueError("name each game once in `games`")
        if self.shape == "preset":  # resolved here, so that run names and saved configs name the shape built
            shape, conv_width = preset_shape(self.size, self.games)
            object.__setattr__(self, "shape", shape)
            object.__setattr__(self, "conv_width", self.conv_width or conv_width)  # a conv_width given stays
        if self.datasets and len(self.datasets) != len(self.games):
            raise ValueError("`datasets` needs one path per game")
        if self.teachers and len(self.teachers) != len(self.games):
            raise ValueError("`teachers` needs one path per game")
        if not (self.tau > 0 and self.lr > 0) or self.batch_size < 1 or self.updates < 1:  # NaN fails `> 0`
            raise ValueError("tau, batch_size, updates and lr must be positive")
        if not all(math.isfinite(x) for x in (self.tau, self.lr, self.width, self.conv_width)):
            raise ValueError("tau, lr, width and conv_width must be finite numbers")
        if not self.width > 0 or self.conv_width < 0 or self.extra_fc < 0:
            raise ValueError("width must be positive, conv_width positive (or 0: follow width) and extra_fc 0 or more")
        if min(self.eval_episodes, self.final_eval_episodes, self.window_batches) < 1:
            raise ValueError("eval_episodes, final_eval_episodes and window_batches must be positive")
        if min(self.seed, self.num_threads) < 0:
            raise ValueError("seed and num_threads must not be negative")
        if self.batch_mode == "mixed" and self.batch_size < len(self.games):
            raise ValueError("mixed batches need at least one row per game")
        if set(self.control) - set(CONTROL_KINDS):
            raise ValueError(f"control lists kinds of control policy: {', '.join(CONTROL_KINDS)}")

    @property
    def run_name(self) -> str:
        if self.name:
            return self.name
        shape = "" if self.shape == "uniform" else shape_tag(self.shape, self.conv_width)
        method = f"kl-tau{self.tau:g}" if self.loss == "kl" and self.tau != DEFAULT_TAU else self.loss
        method += "-norm" if self.loss_norm else ""
        return default_run_name(self.games, method, self.size, self.seed, "-".join(x for x in (shape, self.tag) if x))


class Inputs(NamedTuple):
    games: list[GameSpec]
    datasets: list[Path]
    teachers: list[Path]
    # what each dataset is (its game, creation time and size): a dataset rebuilt, or extended by
    # `dataset build --resume`, under the same path is other data, which a resume must not splice in
    dataset_ids: dict[str, dict] = {}  # game -> {created, steps, episodes}


# ---- set-up -------------------------------------------------------------------------------

def resolve_inputs(cfg: StudentConfig) -> Inputs:
    """Games, datasets and teachers, checked: datasets exist, carry teacher outputs, share a trunk."""
    games = [get_game(g) for g in cfg.games]
    datasets = [Path(p) for p in cfg.datasets] or [dataset_path(g) for g in games]
    teachers = teacher_paths(cfg.teachers, games)
    dataset_ids = {}
    suites = {g.suite for g in games}
    if len(suites) > 1:
        raise UserError(f"games from different suites ({', '.join(sorted(suites))}) cannot share a trunk; "
                        f"distil each suite separately")
    for g, path in zip(games, datasets):
        if not path.exists():
            raise UserError(f"no dataset for {g.name} at {path}; build it with `multitask dataset build {g.name} "
                            f"--steps N` or list its path in `datasets`")
        if not has_teacher_outputs(path):
            raise UserError(f"dataset {path} has no teacher outputs (/steps/teacher_outputs) to distil from; "
                            f"rebuild it with `multitask dataset build`")
        with DatasetReader(path, cache_bytes=0) as d:
            if d.game != g.name:
                raise UserError(f"dataset {path} holds {d.game}, not {g.name}; fix `datasets` in the config")
            if d.info.status != "complete":  # an interrupted build: its data is a prefix of what was asked for
                raise UserError(f"dataset {path} is still being built ({d.info.num_steps:,} of "
                                f"{d.info.target_steps:,} steps); finish it with `multitask dataset build {g.name} "
                                f"--out {path} --steps {d.info.target_steps} --resume`")
            problems = verify_invariants(d, decode_frames=False)  # arrays in memory only: cheap
            if problems:
                more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                raise UserError(f"dataset {path} fails verification: {problems[0]}{more}; "
                                f"`multitask dataset verify {path}` lists every problem; rebuild it")
            env = d.info.env
            dataset_ids[d.game] = {"created": d.info.attrs.get("created"), "steps": d.info.num_steps,
                                   "episodes": d.info.num_episodes}
            if tuple(env["frame_shape"][1:]) != g.frame_shape[1:] or env["stack"] != g.stack:
                raise UserError(f"dataset {path} has observations {env['obs_shape']} that do not match "
                                f"{g.name}'s {list(g.obs_shape)}; rebuild it")
            if cfg.control and not len(played_by(d, cfg.control)):
                raise UserError(f"dataset {path} has no episodes played by {' or '.join(cfg.control)} "
                                f"(its control policies: {', '.join(p['kind'] for p in d.info.policies)})")
    shapes = {(g.frame_shape[1:], g.stack) for g in games}
    if len(shapes) > 1:
        raise UserError(f"observation shapes {sorted(shapes)} cannot share a trunk")
    return Inputs(games, datasets, teachers, dataset_ids)


# ---- the trainer ----------------------------------------------------------------------------

def cosine_lr(lr: float, k: int, total: int) -> float:
    """Cosine decay (Loshchilov & Hutter 2017, no restarts): lr * (1 + cos(pi * k / total)) / 2,
    from lr at update k = 0 through lr / 2 at k = total / 2 to 0 at k = total."""
    return lr * 0.5 * (1.0 + math.cos(math.pi * k / total))


def train_student(cfg: StudentConfig, run_dir: Path | None = None, wandb_mode: WandbMode = "offline",
                  restart: bool = False, show_progress: bool = True) -> dict:
    inputs = resolve_inputs(cfg)
    spec, size = sized_network(cfg.size, inputs.games, cfg.width, cfg.extra_fc, cfg.shape, cfg.conv_width)
    cfg = replace(cfg, width=spec.trunk.width, extra_fc=spec.trunk.extra_fc)  # the config as built
    procs = start_processes(cfg.device)
    cfg = replace(cfg, device=procs.device.type)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    run = Run(run_dir or Path("runs") / "student" / cfg.run_name, cfg, step_metric="updates",
              identity={"network": spec, "world_size": procs.world,
                        "datasets": inputs.dataset_ids},
              writer=procs.main)
    student = Student(spec, cfg, inputs, size.counts("student"), procs.device)
    run.say(student.describe())
    # the cosine schedule is a function of `updates`: a run resumed with another budget would splice
    # two schedules (lr jumping back up at the resume) while its config claimed one
    may_differ = [k for k in RESUMABLE_CHANGES if not (k == "updates" and cfg.lr_schedule == "cosine")]
    run.resume(student, restart, may_differ=may_differ, budget=("updates", cfg.updates, 1))
    run.start(wandb_mode, name=f"student-{cfg.run_name}", job_type="student", group="students",
              extra_config={"parameters": student.counts})
    _distil(student, run, procs, show_progress)
    checksums = gather(checksum(student.net))  # replicas must hold the same weights
    summary = _final_evaluation(student, run, checksums) if procs.main else {}
    stop()
    return summary


class Student:
    """A student in training: network, optimiser, what it distils, and the update count, learning
    curve and best evaluation that state.pt carries."""

    def __init__(self, spec: NetworkSpec, cfg: StudentConfig, inputs: Inputs, counts: dict, device: torch.device):
        self.spec, self.cfg, self.inputs, self.counts, self.device = spec, cfg, inputs, counts, device
        self.teacher_scores = teacher_card_scores(inputs.teachers, inputs.games)  # for periodic % of teacher
        torch.manual_seed(cfg.seed)
        self.net = arrange(MultiHeadNet(spec).to(device), cfg.channels_last)
        optimizer = torch.optim.RMSprop if cfg.optimizer == "rmsprop" else torch.optim.Adam
        self.optimizer = optimizer(self.net.parameters(), lr=cfg.lr)
        self.update = 0
        self.loss_means: list[float | None] = [None] * len(spec.games)  # loss_norm's running means
        self.history: list[dict] = []  # periodic evaluations: the learning curve
        # best.pt's Scores.selection_score (under its historical key) and update
        self.best = {"geomean": -float("inf"), "update": 0}

    def describe(self) -> str:
        c, trunk, cfg = self.counts, self.spec.trunk, self.cfg
        tau = f" (tau {cfg.tau}, teacher side)" if cfg.loss == "kl" else ""
        return (f"student {', '.join(self.spec.games)}: {c['student']:,} parameters ({c['student_one_head']:,} with one "
                f"head = {100 * c['fraction_of_teacher']:.1f}% of a {c['teacher']:,}-parameter teacher); trunk {trunk.shape}, "
                f"width {trunk.width}, conv channels {[out for out, _, _ in trunk.layer_sizes()[0]]}, FC "
                f"{trunk.layer_sizes()[1]} x {1 + trunk.extra_fc}, loss {cfg.loss}{tau}, {cfg.batch_mode} batches")

    def learn(self, model: torch.nn.Module, batch: TrainBatch) -> list[tuple[str, torch.Tensor]]:
        """One update on a batch grouped by game: one trunk pass, each game's head on its rows,
        each game's loss weighing the same. (game, loss) per group, detached tensors on the device:
        reading them waits for the GPU, so the caller reads them when it logs, not every update."""
        cfg, device = self.cfg, next(self.net.parameters()).device
        groups = [(g, slice(a, b)) for g, a, b in batch.groups]
        with autocast(device, cfg.precision):
            outputs = model(batch.obs.to(device, non_blocking=True), groups=groups)
        # fp32 losses in bf16 too; the teacher rows are page-locked on a GPU run, so the copy is asynchronous
        losses = [distillation_loss(cfg.loss, out.float(), q.to(device, non_blocking=True), cfg.tau)
                  for out, q in zip(outputs, batch.teacher)]
        if cfg.loss_norm:
            seen = [g for g, _ in groups]
            values = average([float(l.detach()) for l in losses], self.device)  # the same on every process
            loss, means = normalised_loss(losses, [self.loss_means[g] for g in seen], LOSS_NORM_RATE, values)
            for g, m in zip(seen, means):
                self.loss_means[g] = m
        else:
            loss = torch.stack(losses).mean()
        if cfg.lr_schedule == "cosine":
            for group in self.optimizer.param_groups:
                group["lr"] = cosine_lr(cfg.lr, batch.index, cfg.updates)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.update = batch.index + 1
        return [(self.spec.games[g], l.detach()) for (g, _), l in zip(groups, losses)]

    def card(self, run: Run, scores: Scores | None) -> dict:
        """The provenance written beside best.pt and last.pt."""
        return {"source": "distilled", "config": run.config_dict, "updates": self.update, "parameters": self.counts,
                "datasets": [str(p) for p in self.inputs.datasets], "teachers": [str(p) for p in self.inputs.teachers],
                "teacher_scores": self.teacher_scores, "eval": scores.games if scores else None,
                "wall_time_s": round(run.clock.wall(), 1), "command": configlib.command_line(),
                "world_size": run.identity["world_size"]}

    @property
    def step(self) -> int:
        return self.update

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict(), "update": self.update,
                "best": self.best, "history": self.history, "loss_means": self.loss_means}

    def load_state_dict(self, saved: dict) -> None:
        self.net.load_state_dict(saved["net"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.update, self.best, self.history = saved["update"], saved["best"], saved["history"]
        self.loss_means = saved.get("loss_means", self.loss_means)  # state.pt of runs before loss_norm lacks them


def _distil(student: Student, run: Run, procs: Processes, show_progress: bool) -> None:
    """Update on every batch up to `updates`; log, evaluate and checkpoint on schedule and at the end."""
    cfg, start = student.cfg, student.update
    loader = make_loader(LoaderSpec(
        paths=tuple(str(p) for p in student.inputs.datasets), batch_size=cfg.batch_size, mode=cfg.batch_mode,
        seed=cfg.seed, channels=student.spec.trunk.in_channels, memory_budget=cfg.memory_budget_mb << 20,
        workers=cfg.loader_workers, window_batches=cfg.window_batches, rank=procs.rank, control=cfg.control,
        pin_memory=procs.device.type == "cuda"),
        start=start, stop=cfg.updates)
    # a per-game batch leaves the other games' heads without gradients: DDP must expect it
    model = replicate(student.net, find_unused_parameters=cfg.batch_mode == "per_game" and len(student.spec.games) > 1)
    log_due, eval_due = Every(cfg.log_every, start), Every(cfg.eval_every, start)
    checkpoint_due = Every(cfg.checkpoint_every, start)
    bar = Progress(cfg.updates, f"student {cfg.run_name}", unit="updates", initial=start,
                   enabled=show_progress and procs.main)
    game_losses: dict[str, list[torch.Tensor]] = {g: [] for g in student.spec.games}
    samples, rate = 0, Rate()
    for batch in loader:
        for game, value in student.learn(model, batch):
            game_losses[game].append(value)
        samples += len(batch.obs)
        bar.update(1)
        last = student.update == cfg.updates
        if log_due(student.update) or last:
            metrics = {f"train/{g}/loss": torch.stack(v).double().mean().item() for g, v in game_losses.items() if v}
            run.log({**metrics, "train/lr": student.optimizer.param_groups[0]["lr"],  # the schedule, seen
                     "train/samples_per_s": rate(samples) * procs.world}, student.update)
            bar.update(0, postfix=f"loss {np.mean(list(metrics.values())):.4f}")
            game_losses = {g: [] for g in student.spec.games}
        if (eval_due(student.update) or last) and procs.main:
            _evaluate(student, run)
        if checkpoint_due(student.update) or last:
            run.save_state(student)
    bar.close()
    loader.close()


def _evaluate(student: Student, run: Run) -> None:
    """A periodic evaluation (the last one at the final update): logged, printed, added to the
    learning curve; best.pt if it is the best so far."""
    cfg = student.cfg
    scores = score_games(student.net, student.spec.games, cfg.eval_episodes, PERIODIC_EVAL_SEED + student.update,
                         cfg.eval_workers, student.teacher_scores, student.device)
    student.history.append({"update": student.update, **scores.curve_point()})
    run.report_evaluation(scores.metrics(), scores.line(), student.update)
    if scores.selection_score >= student.best["geomean"]:
        student.best = {"geomean": scores.selection_score, "update": student.update}
        run.save_agent("best", student.net, "student", student.card(run, scores))


def _final_evaluation(student: Student, run: Run, checksums: list[float]) -> dict:
    """last.pt; best.pt scored on fresh seeds with more episodes (no selection bias), beside the
    teachers on the same seeds; summary.json, table.md and one line."""
    cfg, inputs = student.cfg, student.inputs
    run.save_agent("last", student.net, "student", student.card(run, None))
    teachers = measured_teacher_scores(inputs.teachers, inputs.games, cfg.final_eval_episodes, FINAL_EVAL_SEED,
                                       cfg.eval_workers, run.folder.parent / ".teacher_scores", student.device)
    best = load_agent(run.folder / "best.pt").net
    final = score_games(best, student.spec.games, cfg.final_eval_episodes, FINAL_EVAL_SEED, cfg.eval_workers, teachers,
                        student.device)
    summary = {
        "run": cfg.run_name, "run_dir": str(run.folder), "config": run.config_dict, "parameters": student.counts,
        "updates": student.update, "best_update": student.best["update"],
        "datasets": {g.name: {"path": str(p), **inputs.dataset_ids[g.name]} for g, p in zip(inputs.games, inputs.datasets)},
        "teachers": teacher_files(inputs.teachers, inputs.games), "teacher_scores": teachers,
        "teacher_card_scores": student.teacher_scores, "scores": final.means, "pct_teacher": final.pct_teacher,
        "geomean_pct_teacher": final.geomean_pct_teacher, "episodes": final.games, "history": student.history,
        "wall_time_s": round(run.clock.wall(), 1), "world_size": run.identity["world_size"],
        "replica_checksums": checksums, "replicas_identical": len(set(checksums)) == 1,
    }
    run.write_text("summary.json", json.dumps(summary, indent=2) + "\n")
    run.write_text("table.md", run_table(summary) + "\n")
    run.log({f"final/{k}": v for k, v in final.metrics().items()}, student.update)
    run.finish({"geomean_pct_teacher": final.geomean_pct_teacher, "best_update": student.best["update"]})
    print(f"student {cfg.run_name}: {final.line()}; best update {student.best['update']:,}, "
          f"{run.clock.wall() / 60:.1f} min -> {run.folder} (table.md, summary.json)")
    return summary
