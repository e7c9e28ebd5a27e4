"""`multitask student train`: offline policy distillation into one multi-head student.

Reads top to bottom: resolve datasets and teachers -> build the student (size preset) -> resume ->
distributed set-up -> (batch, loss per game, update, log, evaluate, checkpoint)* -> final
evaluation and summary. Runs under `torchrun --nproc-per-node K` with DistributedDataParallel
(NCCL on GPUs, gloo on CPUs); rank 0 evaluates, logs and writes checkpoints.

Run directory (`runs/student/<name>/`): config.toml, state.pt (resume), best.pt / last.pt (agent
checkpoints for `multitask evaluate`, with .json cards), metrics.jsonl, summary.json, wandb/.
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist

from multitask import config as configlib
from multitask.agents.checkpoints import load_agent, save_agent
from multitask.files import atomic_torch_save, atomic_write_text
from multitask.config import option
from multitask.envs import GameSpec, get_game
from multitask.errors import UserError
from multitask.evaluation.protocol import evaluate_games
from multitask.data.loader import LoaderSpec, make_loader
from multitask.training.losses import LossName, distillation_loss
from multitask.agents.networks import (MultiHeadNet, NetworkSpec, parameter_count,
                                teacher_network_spec, width_for_fraction)
from multitask.progress import Progress
from multitask.evaluation.report import pct_of_teacher, run_table
from multitask.data.storage import DatasetReader, has_teacher_outputs
from multitask.training.tracking import Tracker, WandbMode

SizePreset = Literal["100%", "25%", "7%", "4%", "multitask", "custom"]
SIZE_FRACTIONS = {"100%": 1.0, "25%": 0.25, "7%": 0.07, "4%": 0.04}
FINAL_EVAL_SEED = 777_777  # students and teachers meet the same env seeds in the final evaluation
MULTITASK_FACTOR = 4.0  # Rusu et al. 2016: the multi-task student had ~4x a teacher's parameters


@dataclass(frozen=True)
class StudentConfig:
    games: tuple[str, ...] = option((), "games to distil, one head each (one game = single-game distillation)")
    datasets: tuple[str, ...] = option((), "one dataset per game (default: datasets/<suite>/<Game>.h5)")
    teachers: tuple[str, ...] = option((), "teacher per game, for % of teacher (default: teachers/<suite>/<Game>.pt)")
    name: str = option("", "run name (default: derived from games, loss and size)")
    seed: int = option(0, "seeds the student's initialisation and every batch (batch k = f(seed, k, rank))")
    loss: LossName = option("kl", "kl (Rusu et al. 2016's best), nll on the teacher's greedy action, or mse on Q-values")
    tau: float = option(0.01, "teacher-side softmax temperature for kl (Rusu et al. 2016: 0.01)")
    batch_mode: Literal["per_game", "mixed"] = option("per_game", "per_game: each batch one game (paper A's appendix); mixed: B/G rows of every game")
    batch_size: int = option(256, "rows per batch and process (paper A: not stated)")
    optimizer: Literal["rmsprop", "adam"] = option("rmsprop", "paper A used RMSProp")
    lr: float = option(1e-4, "learning rate (paper A: between 1e-4 and 1e-3)")
    lr_schedule: Literal["constant", "cosine"] = option("constant", "constant, or cosine decay to 0 over `updates` (paper A: not stated)")
    updates: int = option(20_000, "gradient updates")
    size: SizePreset = option("100%", "student size relative to a teacher's parameters; multitask = ~4x plus one FC layer")
    width: float = option(1.0, "width multiplier, used with size = custom")
    extra_fc: int = option(0, "extra hidden FC layers, used with size = custom")
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

    def __post_init__(self):
        if not self.games:
            raise ValueError("name at least one game in `games`")
        if self.datasets and len(self.datasets) != len(self.games):
            raise ValueError("`datasets` needs one path per game")
        if self.teachers and len(self.teachers) != len(self.games):
            raise ValueError("`teachers` needs one path per game")
        if self.tau <= 0 or self.batch_size < 1 or self.updates < 1 or self.lr <= 0:
            raise ValueError("tau, batch_size, updates and lr must be positive")
        if self.batch_mode == "mixed" and self.batch_size < len(self.games):
            raise ValueError("mixed batches need at least one row per game")

    @property
    def run_name(self) -> str:
        if self.name:
            return self.name
        games = "-".join(g.split("/")[1] for g in self.games) if len(self.games) <= 2 else f"{len(self.games)}games"
        return f"{self.games[0].split('/')[0]}-{games}-{self.loss}-{self.size.replace('%', 'pct')}-s{self.seed}"


# ---- set-up helpers ------------------------------------------------------------------------

def resolve_inputs(cfg: StudentConfig) -> tuple[list[GameSpec], list[Path], list[Path]]:
    """Games, datasets and teachers, checked: datasets exist, carry teacher outputs, share a trunk."""
    games = [get_game(g) for g in cfg.games]
    datasets = [Path(p) for p in cfg.datasets] or [Path("datasets") / g.suite / f"{g.game}.h5" for g in games]
    teachers = [Path(p) for p in cfg.teachers] or [Path("teachers") / g.suite / f"{g.game}.pt" for g in games]
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
            env = d.info.env
            if tuple(env["frame_shape"][1:]) != g.frame_shape[1:] or env["stack"] != g.stack:
                raise UserError(f"dataset {path} has observations {env['obs_shape']} that do not match "
                                f"{g.name}'s {list(g.obs_shape)}; rebuild it")
    shapes = {(g.frame_shape[1:], g.stack) for g in games}
    if len(shapes) > 1:
        raise UserError(f"observation shapes {sorted(shapes)} cannot share a trunk")
    return games, datasets, teachers


def student_network(cfg: StudentConfig, games: list[GameSpec]) -> tuple[NetworkSpec, dict]:
    """The student's architecture from the size preset, and the parameter counts behind it."""
    teacher_specs = [teacher_network_spec(g) for g in games]
    teacher_params = [parameter_count(s.trunk, s.num_actions) for s in teacher_specs]
    base = teacher_specs[0].trunk
    channels = max(g.obs_shape[0] for g in games)
    actions = tuple(g.num_actions for g in games)
    if cfg.size in SIZE_FRACTIONS:
        fraction = SIZE_FRACTIONS[cfg.size]
        width = 1.0 if fraction == 1.0 else width_for_fraction(base, games[0].num_actions, fraction)
        trunk = replace(base, in_channels=channels, width=width)
    elif cfg.size == "multitask":
        target = MULTITASK_FACTOR * float(np.mean(teacher_params))
        lo, hi = 0.01, 16.0
        for _ in range(50):
            mid = (lo + hi) / 2
            t = replace(base, in_channels=channels, width=mid, extra_fc=1)
            lo, hi = (mid, hi) if parameter_count(t, actions) < target else (lo, mid)
        trunk = replace(base, in_channels=channels, width=math.ceil(hi * 1e4) / 1e4, extra_fc=1)
    else:
        trunk = replace(base, in_channels=channels, width=cfg.width, extra_fc=cfg.extra_fc)
    spec = NetworkSpec(trunk, tuple(g.name for g in games), actions)
    params = parameter_count(trunk, actions)
    one_head = parameter_count(trunk, actions[:1])
    counts = {"student": params, "student_one_head": one_head, "teacher": teacher_params[0],
              "teachers": dict(zip([g.name for g in games], teacher_params)),
              "fraction_of_teacher": one_head / teacher_params[0],
              "fraction_of_mean_teacher": params / float(np.mean(teacher_params))}
    return spec, counts


def measured_teacher_scores(teachers: list[Path], games: list[GameSpec], episodes: int, seed: int,
                            workers: int, cache_dir: Path) -> dict[str, float | None]:
    """Each teacher scored by the same protocol, episodes and seed as the student's final evaluation.

    Card scores come from 20 episodes, which is too few to divide by (Seaquest: 15.8 on its card,
    11.9 over 100 episodes). Results are cached by teacher sha256, episodes and seed.
    """
    scores: dict[str, float | None] = {}
    for g, path in zip(games, teachers):
        if not path.exists():
            scores[g.name] = None
            continue
        agent = load_agent(path)
        cached = cache_dir / f"{agent.sha256[:16]}-{g.game}-{episodes}-{seed}.json"
        if cached.exists():
            scores[g.name] = json.loads(cached.read_text())["mean"]
            continue
        result = evaluate_games(agent.net, [g.name], episodes, seed, workers=workers)[g.name].to_dict()
        atomic_write_text(cached, json.dumps({**result, "teacher": str(path), "sha256": agent.sha256}) + "\n")
        scores[g.name] = result["mean"]
    return scores


def teacher_scores(teachers: list[Path], games: list[GameSpec]) -> dict[str, float | None]:
    """Each teacher's evaluation score from its card (used for periodic evaluations)."""
    scores = {}
    for g, path in zip(games, teachers):
        if not path.exists():
            scores[g.name] = None
            continue
        card = load_agent(path).card
        scores[g.name] = (card.get("eval") or {}).get("mean")
    return scores


# ---- distributed --------------------------------------------------------------------------

def _distributed() -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    # rank 0 evaluates whole games while the others wait in the next all-reduce: allow for it
    dist.init_process_group(backend, timeout=datetime.timedelta(hours=2))
    rank = dist.get_rank()
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def _lr_at(lr: float, k: int, total: int) -> float:
    """Cosine decay: lr * (1 + cos(pi * k / total)) / 2, from lr at k = 0 to 0 at k = total."""
    return lr * 0.5 * (1.0 + math.cos(math.pi * k / total))


def _checksum(net: torch.nn.Module) -> float:
    return float(sum(p.detach().double().sum().item() * (i + 1) for i, p in enumerate(net.parameters())))


# ---- the trainer ----------------------------------------------------------------------------

def train_student(cfg: StudentConfig, run_dir: Path | None = None, wandb_mode: WandbMode = "offline",
                  restart: bool = False, show_progress: bool = True) -> dict:
    # ---- Phase 1: inputs, architecture, run directory ------------------------------------------
    games, dataset_paths, teacher_paths = resolve_inputs(cfg)
    spec, counts = student_network(cfg, games)
    rank, world, device = _distributed()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    run_dir = Path(run_dir or Path("runs") / "student" / cfg.run_name)
    main_rank = rank == 0
    teacher_score = teacher_scores(teacher_paths, games)
    cfg_dict = configlib.to_dict(cfg)
    if main_rank:
        print(f"student {spec.games}: {counts['student']:,} parameters ({counts['student_one_head']:,} with one "
              f"head = {100 * counts['fraction_of_teacher']:.1f}% of a {counts['teacher']:,}-parameter teacher); "
              f"trunk width {spec.trunk.width}, extra FC {spec.trunk.extra_fc}, loss {cfg.loss}"
              f"{f' (tau {cfg.tau}, teacher side)' if cfg.loss == 'kl' else ''}, {cfg.batch_mode} batches",
              file=sys.stderr)

    # ---- Phase 2: network and optimiser, resumed if a checkpoint exists ------------------------
    torch.manual_seed(cfg.seed)
    net = MultiHeadNet(spec).to(device)
    opt_cls = torch.optim.RMSprop if cfg.optimizer == "rmsprop" else torch.optim.Adam
    optimizer = opt_cls(net.parameters(), lr=cfg.lr)
    schedule = _lr_at if cfg.lr_schedule == "cosine" else None
    state_path = run_dir / "state.pt"
    if restart and main_rank and state_path.exists():
        state_path.unlink()
    if world > 1:
        dist.barrier()
    start, best, history, wandb_id, wall_before = 0, {"geomean": -1.0, "update": 0}, [], None, 0.0
    if state_path.exists():
        saved = torch.load(state_path, map_location=device, weights_only=True)
        if saved["network"] != spec.to_dict():
            raise UserError(f"checkpoint {state_path} is for another architecture ({saved['network']['trunk']}); "
                            f"pass --restart or use another run name")
        mismatch = [k for k in cfg_dict if k not in ("updates", "num_threads", "eval_workers")
                    and saved["config"].get(k) != cfg_dict[k]]
        if mismatch:
            raise UserError(f"run {run_dir} was started with a different config ('{mismatch[0]}' differs); "
                            f"pass --restart or use another run name")
        if saved.get("world_size", 1) != world:
            raise UserError(f"run {run_dir} was started with {saved.get('world_size', 1)} process(es); resume it "
                            f"with the same number (each rank's batches depend on it)")
        net.load_state_dict(saved["net"])
        optimizer.load_state_dict(saved["optimizer"])
        start, best, history = saved["update"], saved["best"], saved["history"]
        wandb_id, wall_before = saved["wandb_id"], saved["wall_time_s"]
        if main_rank:
            print(f"resuming {run_dir} at update {start:,}", file=sys.stderr)
    model = net
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            net, find_unused_parameters=cfg.batch_mode == "per_game" and len(games) > 1)

    # ---- Phase 3: data, tracking ----------------------------------------------------------------
    loader = make_loader(LoaderSpec(
        paths=tuple(str(p) for p in dataset_paths), batch_size=cfg.batch_size, mode=cfg.batch_mode,
        seed=cfg.seed, channels=spec.trunk.in_channels, memory_budget=cfg.memory_budget_mb << 20,
        workers=cfg.loader_workers, window_batches=cfg.window_batches, rank=rank, world_size=world),
        start=start, stop=cfg.updates)
    tracker = Tracker(wandb_mode if main_rank else "off", run_dir, name=f"student-{cfg.run_name}",
                      job_type="student", config={**cfg_dict, "parameters": counts}, step_metric="updates",
                      run_id=wandb_id, group="students")
    if main_rank:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.toml", configlib.to_toml(cfg))
    metrics_log = open(run_dir / "metrics.jsonl", "a") if main_rank else None
    t_start = time.perf_counter()

    def wall_time() -> float:
        return wall_before + time.perf_counter() - t_start

    def log(metrics: dict, update: int) -> None:
        if main_rank:
            tracker.log(metrics, update)
            metrics_log.write(json.dumps({"updates": update, **metrics}) + "\n")
            metrics_log.flush()

    def card(update: int, scores: dict | None) -> dict:
        return {"source": "distilled", "config": cfg_dict, "updates": update, "parameters": counts,
                "datasets": [str(p) for p in dataset_paths], "teachers": [str(p) for p in teacher_paths],
                "teacher_scores": teacher_score, "eval": scores, "wall_time_s": round(wall_time(), 1),
                "command": configlib.command_line(), "world_size": world}

    def evaluate(episodes: int, seed: int) -> tuple[dict, dict, float | None]:
        on_cpu = net if device.type == "cpu" else copy.deepcopy(net).cpu()
        results = evaluate_games(on_cpu, list(spec.games), episodes, seed, workers=cfg.eval_workers)
        scores = {g: r.mean for g, r in results.items()}
        pct, geomean = pct_of_teacher(scores, teacher_score)
        return {g: r.to_dict() for g, r in results.items()}, pct, geomean

    def eval_metrics(scores: dict, pct: dict, geomean: float | None) -> dict:
        m = {f"eval/{g}/score": s["mean"] for g, s in scores.items()}
        m.update({f"eval/{g}/pct_teacher": p for g, p in pct.items()})
        if geomean is not None:
            m["eval/geomean_pct_teacher"] = geomean
            m["eval/mean_pct_teacher"] = float(np.mean(list(pct.values())))
        return m

    def save_state(update: int) -> None:
        atomic_torch_save({"network": spec.to_dict(), "config": cfg_dict, "net": net.state_dict(),
                           "optimizer": optimizer.state_dict(), "update": update, "best": best,
                           "history": history, "wandb_id": tracker.run_id, "wall_time_s": wall_time(),
                           "world_size": world}, state_path)

    # ---- Phase 4: distil -------------------------------------------------------------------------
    bar = Progress(cfg.updates, f"student {cfg.run_name}", unit="updates", initial=start, enabled=show_progress and main_rank)
    game_loss = {g: [] for g in spec.games}
    samples, t_log, update = 0, time.perf_counter(), start
    for batch in loader:
        obs = batch.obs.to(device, non_blocking=True)
        groups = [(g, slice(a, b)) for g, a, b in batch.groups]
        outputs = model(obs, groups=groups)  # one trunk pass, then each game's head on its rows
        losses = [distillation_loss(cfg.loss, out, q.to(device), cfg.tau)
                  for out, q in zip(outputs, batch.teacher)]
        loss = torch.stack(losses).mean()  # each game in the batch weighs the same
        if schedule is not None:
            for group in optimizer.param_groups:
                group["lr"] = schedule(cfg.lr, batch.index, cfg.updates)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        update = batch.index + 1
        samples += len(obs)
        for (g, _), l in zip(groups, losses):
            game_loss[spec.games[g]].append(l.item())
        bar.update(1, postfix=f"loss {loss.item():.4f}")

        if update % cfg.log_every == 0 or update == cfg.updates:
            now = time.perf_counter()
            m = {f"train/{g}/loss": float(np.mean(v)) for g, v in game_loss.items() if v}
            m["train/samples_per_s"] = samples * world / (now - t_log)
            log(m, update)
            game_loss = {g: [] for g in spec.games}
            samples, t_log = 0, now

        if main_rank and cfg.eval_every and update % cfg.eval_every == 0 and update < cfg.updates:
            scores, pct, geomean = evaluate(cfg.eval_episodes, seed=10_000 + update)
            history.append({"update": update, "scores": {g: s["mean"] for g, s in scores.items()},
                            "pct_teacher": pct, "geomean_pct_teacher": geomean})
            log(eval_metrics(scores, pct, geomean), update)
            key = geomean if geomean is not None else float(np.mean([s["mean"] for s in scores.values()]))
            if key >= best["geomean"]:
                best = {"geomean": key, "update": update}
                save_agent(run_dir / "best.pt", net, "student", card(update, scores))

        if update % cfg.checkpoint_every == 0 or update == cfg.updates:
            if main_rank:
                save_state(update)
            if world > 1:
                dist.barrier()
    bar.close()
    loader.close()

    # ---- Phase 5: final evaluation, best/last checkpoints, summary --------------------------------
    checksums = [_checksum(net)]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, checksums[0])
        checksums = gathered
    summary = {}
    if main_rank:
        save_agent(run_dir / "last.pt", net, "student", card(update, None))
        scores, pct, geomean = evaluate(cfg.eval_episodes, seed=10_000 + update)
        history.append({"update": update, "scores": {g: s["mean"] for g, s in scores.items()},
                        "pct_teacher": pct, "geomean_pct_teacher": geomean})
        key = geomean if geomean is not None else float(np.mean([s["mean"] for s in scores.values()]))
        if key >= best["geomean"] or not (run_dir / "best.pt").exists():
            best = {"geomean": key, "update": update}
            save_agent(run_dir / "best.pt", net, "student", card(update, scores))
        # the reported numbers: best.pt on fresh seeds, more episodes (no selection bias)
        chosen = load_agent(run_dir / "best.pt")
        final = evaluate_games(chosen.net, list(spec.games), cfg.final_eval_episodes, seed=FINAL_EVAL_SEED,
                               workers=cfg.eval_workers)
        final_scores = {g: r.mean for g, r in final.items()}
        final_teacher = measured_teacher_scores(teacher_paths, games, cfg.final_eval_episodes, FINAL_EVAL_SEED,
                                                cfg.eval_workers, cache_dir=run_dir.parent / ".teacher_scores")
        final_pct, final_geomean = pct_of_teacher(final_scores, final_teacher)
        summary = {
            "run": cfg.run_name, "run_dir": str(run_dir), "config": cfg_dict, "parameters": counts,
            "updates": update, "best_update": best["update"], "teacher_scores": final_teacher,
            "teacher_card_scores": teacher_score,
            "scores": final_scores, "pct_teacher": final_pct, "geomean_pct_teacher": final_geomean,
            "episodes": {g: r.to_dict() for g, r in final.items()}, "history": history,
            "wall_time_s": round(wall_time(), 1), "world_size": world, "replica_checksums": checksums,
            "replicas_identical": len(set(checksums)) == 1,
        }
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        atomic_write_text(run_dir / "table.md", run_table(summary) + "\n")
        log({f"final/{k}": v for k, v in eval_metrics(
            {g: {"mean": s} for g, s in final_scores.items()}, final_pct, final_geomean).items()}, update)
        tracker.summary({"geomean_pct_teacher": final_geomean, "best_update": best["update"]})
        tracker.finish()
        metrics_log.close()
        table = ", ".join(f"{g.split('/')[1]} {final_scores[g]:.1f}"
                          + (f" ({final_pct[g]:.0f}%)" if g in final_pct else "") for g in spec.games)
        geo = f"; geometric mean {final_geomean:.0f}% of teachers" if final_geomean is not None else ""
        print(f"student {cfg.run_name}: {table}{geo}; best update {best['update']:,}, "
              f"{wall_time() / 60:.1f} min -> {run_dir} (table.md, summary.json)")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary
