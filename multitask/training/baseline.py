"""`multitask baseline train`: one multi-task DQN trained jointly online on all games (the
baseline the distilled student is compared with; Rusu et al. 2016, "multi-task DQN").

Reads top to bottom: resolve games -> size the network (the students' `MultiHeadNet` and presets)
-> resume -> (every game acts, learn, log, evaluate, checkpoint)* -> final evaluation of best.pt
beside the teachers -> summary.json, table.md. The DQN is the teacher's: `DQNLearner`,
`ReplayMemory` and acting (`training/acting`) per game, one replay memory per game.

What follows the teacher. Every key left unset (None) takes the value of the teacher's suite
preset (configs/teacher/<suite>.toml, or `teacher_preset`), and the [dqn] table starts from the
preset's; total_steps_per_game is the preset's total_steps, so every game gets the env steps its
teacher had. `update_ratio` counts updates per env step summed over games, so each game's data is
replayed as often as its teacher's was; in per_game mode updates take the games in turn, in mixed
mode each batch holds B/G rows of every game (`rows_per_game`) and each game's loss weighs 1/G.

Resume is exact. Env states cannot be saved (MinAtar, ale-py's vector env), so episodes restart
at every checkpoint, in a straight run as in a resumed one, with seeds fixed by the checkpoint's
index: what follows a checkpoint is a function of state.pt alone, and a run killed at any instant
and resumed ends with the weights of an uninterrupted run (CPU, same threads). A restart cuts at
most one unfinished episode per env per checkpoint (its transitions are kept).

Run folder (`runs/baseline/<name>/`, the shared one of `training/run`): config.toml, state.pt,
best.pt / last.pt (kind "multitask-dqn", for `multitask evaluate`), metrics.jsonl, summary.json,
table.md, wandb/.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch

from multitask import config as configlib
from multitask.agents.dqn import DQNConfig, DQNLearner, linear_schedule
from multitask.agents.networks import MultiHeadNet, NetworkSpec
from multitask.agents.replay import join_batches, rows_per_game
from multitask.agents.sizes import SizePreset, sized_network
from multitask.config import option
from multitask.envs import GameSpec, get_game
from multitask.errors import UserError
from multitask.progress import Progress
from multitask.training.acting import Acting
from multitask.training.run import Every, Rate, Run, default_run_name
from multitask.devices import (CHANNELS_LAST_DOC, DEVICE_DOC, PRECISION_DOC, DeviceName, Precision, arrange,
                               pick_device)
from multitask.training.evaluating import final_evaluation, periodic_evaluation
from multitask.training.scoring import Scores, teacher_card_scores, teacher_paths
from multitask.training.teacher import load_config as load_teacher_config
from multitask.training.tracking import WandbMode

TEACHER = "None: the teacher's suite preset"
# keys that take the teacher preset's value when unset; total_steps_per_game takes its total_steps
FOLLOWS_TEACHER = ("num_envs", "replay_capacity", "learning_starts", "update_ratio", "eps_start", "eps_end",
                   "eps_decay_steps", "life_loss_terminal", "eval_every", "eval_episodes", "checkpoint_every",
                   "log_every", "num_threads")
RESUMABLE_CHANGES = ("total_steps_per_game", "num_threads", "eval_workers", "device", "precision", "channels_last")
GAME_SEED_STRIDE = 1_000  # game g's replay, exploration and env seeds start at seed + 1,000 g
RESTART_SEED_STRIDE = 7919  # after checkpoint k, env i of game g plays seed + 1,000 g + 7,919 k + i


@dataclass(frozen=True)
class BaselineConfig:
    games: tuple[str, ...] = option((), "games trained jointly, one head each, all of one suite")
    teachers: tuple[str, ...] = option((), "teacher per game, for % of teacher (default: teachers/<suite>/<Game>.pt)")
    name: str = option("", "run name (default: derived from games, size and seed)")
    seed: int = option(0, "seeds the network, every game's replay, exploration and envs")
    size: SizePreset = option("multitask", "network size preset, as the students' (multitask: ~4x a teacher plus one FC layer)")
    width: float = option(1.0, "trunk width multiplier for size = custom; the saved config holds the width its preset built")
    extra_fc: int = option(0, "extra hidden FC layers for size = custom; the saved config holds what its preset built")
    teacher_preset: str = option("", "teacher config the None keys and [dqn] follow (empty: configs/teacher/<suite>.toml)")
    total_steps_per_game: int | None = option(None, "env steps per game (None: the teacher preset's total_steps, as a teacher had)")
    num_envs: int | None = option(None, f"envs per game, stepped together ({TEACHER})")
    replay_capacity: int | None = option(None, f"transitions in each game's replay, frames stored once ({TEACHER})")
    learning_starts: int | None = option(None, f"env steps per game before the first update ({TEACHER})")
    update_ratio: float | None = option(None, f"gradient updates per env step, all games summed ({TEACHER})")
    eps_start: float | None = option(None, f"initial exploration epsilon ({TEACHER})")
    eps_end: float | None = option(None, f"final exploration epsilon ({TEACHER})")
    eps_decay_steps: int | None = option(None, f"env steps per game of linear epsilon decay ({TEACHER})")
    life_loss_terminal: bool | None = option(None, f"a lost life ends the episode for bootstrapping ({TEACHER})")
    batch_mode: Literal["per_game", "mixed"] = option("per_game", "per_game: each update one game's batch, games in turn; mixed: B/G rows of every game (as the student's)")
    eval_every: int | None = option(None, f"env steps per game between evaluations of every game ({TEACHER})")
    eval_episodes: int | None = option(None, f"episodes per game in periodic evaluations ({TEACHER})")
    final_eval_episodes: int = option(100, "episodes per game in the final evaluation of best.pt and of the teachers (the student's)")
    eval_workers: int = option(2, "processes evaluating games in parallel")
    checkpoint_every: int | None = option(None, f"env steps per game between resumable checkpoints ({TEACHER})")
    log_every: int | None = option(None, f"env steps per game between metric logs ({TEACHER})")
    num_threads: int | None = option(None, f"torch CPU threads, 0: torch's default ({TEACHER})")
    device: DeviceName = option("auto", DEVICE_DOC)
    precision: Precision = option("fp32", PRECISION_DOC)
    channels_last: bool = option(False, CHANNELS_LAST_DOC)
    dqn: DQNConfig = option(DQNConfig(), "the DQN learner ([dqn] table; unset keys: the teacher preset's [dqn])")

    def __post_init__(self):
        if not self.games:
            raise ValueError("name at least one game in `games`")
        if len(set(self.games)) != len(self.games):
            raise ValueError("name each game once in `games`")
        if self.teachers and len(self.teachers) != len(self.games):
            raise ValueError("`teachers` needs one path per game")
        if self.batch_mode == "mixed" and self.dqn.batch_size < len(self.games):
            raise ValueError("mixed batches need dqn.batch_size of at least one row per game")
        given = {k: v for k, v in vars(self).items() if v is not None}  # None: the teacher preset's, checked there
        if min(given.get(k, 1) for k in ("total_steps_per_game", "num_envs", "eval_episodes", "final_eval_episodes")) < 1:
            raise ValueError("total_steps_per_game, num_envs, eval_episodes and final_eval_episodes must be positive")
        if min(given.get(k, 0) for k in ("seed", "num_threads")) < 0:
            raise ValueError("seed and num_threads must not be negative")
        if not all(0.0 <= given.get(k, 0.0) <= 1.0 for k in ("eps_start", "eps_end")):
            raise ValueError("eps_start and eps_end must be in [0, 1]")

    @property
    def run_name(self) -> str:
        if self.name:
            return self.name
        return default_run_name(self.games, "dqn", self.size, self.seed)


def _layer(base: dict, top: dict) -> dict:
    """`top` over `base`, tables merged key by key."""
    out = dict(base)
    for k, v in top.items():
        out[k] = _layer(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def load_config(path: Path | None, overrides: list[str]) -> BaselineConfig:
    """Defaults <- the teacher preset (FOLLOWS_TEACHER, total_steps, [dqn]) <- the TOML <- overrides.
    The user's file and overrides are checked alone first, so that errors name them."""
    mine = configlib.load(BaselineConfig, path, overrides)
    suite = resolve_games(mine)[0][0].suite
    teacher = load_teacher_config(suite, Path(mine.teacher_preset) if mine.teacher_preset else None, [])
    preset = configlib.to_dict(teacher)
    base = {**{k: preset[k] for k in FOLLOWS_TEACHER}, "total_steps_per_game": preset["total_steps"],
            "dqn": preset["dqn"]}
    data = _layer(base, configlib.read_toml(Path(path)) if path else {})
    return configlib.load(BaselineConfig, None, overrides, data=data)


def resolve_games(cfg: BaselineConfig, listed_exist: bool = True) -> tuple[list[GameSpec], list[Path]]:
    """The games (known, of one suite) and each one's teacher path (scoring.teacher_paths)."""
    games = [get_game(g) for g in cfg.games]
    suites = sorted({g.suite for g in games})
    if len(suites) > 1:
        raise UserError(f"games from different suites ({', '.join(suites)}) cannot share a trunk; "
                        f"train a baseline per suite")
    return games, teacher_paths(cfg.teachers, games, listed_exist)


def train_baseline(cfg: BaselineConfig, run_dir: Path | None = None, wandb_mode: WandbMode = "offline",
                   restart: bool = False, show_progress: bool = True) -> dict:
    unset = [k for k in (*FOLLOWS_TEACHER, "total_steps_per_game") if getattr(cfg, k) is None]
    if unset:
        raise ValueError(f"build the config with load_config (unset: {', '.join(unset)})")
    games, teachers = resolve_games(cfg)
    spec, size = sized_network(cfg.size, games, cfg.width, cfg.extra_fc)
    device = pick_device(cfg.device)
    cfg = replace(cfg, width=spec.trunk.width, extra_fc=spec.trunk.extra_fc, device=device.type)  # as built
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    run = Run(run_dir or Path("runs") / "baseline" / cfg.run_name, cfg, step_metric="env_steps",
              identity={"network": spec})
    dqn = MultitaskDQN(spec, cfg, games, device, size.counts("network"), teacher_card_scores(teachers, games))
    run.say(dqn.describe())
    if cfg.learning_starts >= cfg.total_steps_per_game:  # allowed (a play-only run), but rarely meant
        run.say(f"note: learning_starts={cfg.learning_starts:,} >= total_steps_per_game="
                f"{cfg.total_steps_per_game:,}: the network is never updated")
    run.resume(dqn, restart, may_differ=RESUMABLE_CHANGES,
               budget=("total_steps_per_game", cfg.total_steps_per_game, cfg.num_envs))
    run.start(wandb_mode, name=f"baseline-{cfg.run_name}", job_type="baseline", group="baselines",
              extra_config={"parameters": dqn.counts})
    _train(dqn, run, show_progress)
    return final_evaluation(dqn, run, teachers, "multitask-dqn", "multitask-dqn", "baseline")


class MultitaskDQN:
    """The multi-task DQN in training: one network and learner, one `Acting` per game, and the
    update credit, losses, learning curve and best evaluation that state.pt carries."""

    def __init__(self, spec: NetworkSpec, cfg: BaselineConfig, games: list[GameSpec], device: torch.device,
                 counts: dict, teacher_scores: dict[str, float | None]):
        self.spec, self.cfg, self.games, self.counts, self.teacher_scores = spec, cfg, games, counts, teacher_scores
        torch.manual_seed(cfg.seed)
        self.device = device
        self.net = arrange(MultiHeadNet(spec).to(device), cfg.channels_last)
        self.learner = DQNLearner(self.net, cfg.dqn, cfg.precision)
        self.acting = [Acting(g, cfg.num_envs, cfg.replay_capacity, cfg.seed + GAME_SEED_STRIDE * i,
                              cfg.life_loss_terminal) for i, g in enumerate(games)]
        self.update_credit = 0.0
        self.last_loss = [float("nan")] * len(games)
        self.history: list[dict] = []  # periodic evaluations: the learning curve
        self.best = {"score": -float("inf"), "env_steps": 0}  # best.pt's Scores.selection_score

    def describe(self) -> str:
        c, trunk = self.counts, self.spec.trunk
        return (f"multi-task DQN {', '.join(self.spec.games)}: {c['network']:,} parameters "
                f"({c['fraction_of_mean_teacher']:.2f}x a mean teacher); trunk width {trunk.width}, extra FC "
                f"{trunk.extra_fc}, {self.cfg.batch_mode} batches, on {self.cfg.device}")

    @property
    def env_steps(self) -> int:
        """Env steps per game (every game is stepped in every iteration)."""
        return self.acting[0].env_steps

    @property
    def step(self) -> int:
        return self.env_steps

    @property
    def updates(self) -> int:
        return self.learner.updates

    def begin_episodes(self) -> None:
        """Fresh episodes in every game, seeded by how many checkpoints lie behind (module doc)."""
        k = self.env_steps // self.cfg.checkpoint_every if self.cfg.checkpoint_every else 0
        for i, acting in enumerate(self.acting):
            acting.begin(self.cfg.seed + GAME_SEED_STRIDE * i + RESTART_SEED_STRIDE * k)

    def act(self, epsilon: float) -> None:
        for head, acting in enumerate(self.acting):
            acting.act(self.net, head, epsilon)

    def learn(self) -> None:
        """update_ratio updates per env step of all games, once learning_starts steps per game are stored."""
        cfg, n = self.cfg, len(self.games)
        if self.env_steps < cfg.learning_starts:
            return
        self.update_credit += n * cfg.num_envs * cfg.update_ratio
        while self.update_credit >= 1.0:
            self.update_credit -= 1.0
            if cfg.batch_mode == "per_game":
                g = self.learner.updates % n  # the games in turn
                batch = self.acting[g].memory.sample(cfg.dqn.batch_size).to(self.device)
                self.last_loss[g] = self.learner.update(batch, head=g)["loss"]
                continue
            rows = rows_per_game(cfg.dqn.batch_size, n)
            batch, groups = join_batches([a.memory.sample(r) for a, r in zip(self.acting, rows)],
                                         self.spec.trunk.in_channels)
            self.last_loss = self.learner.update_grouped(batch.to(self.device), groups)["losses"]

    def train_metrics(self, epsilon: float, steps_per_s: float) -> dict[str, float]:
        """train/<suite>/<Game>/{episode_return,loss,epsilon,steps_per_s,episodes}, and the update count."""
        m: dict[str, float] = {"train/updates": self.learner.updates}
        for g, acting, loss in zip(self.spec.games, self.acting, self.last_loss):
            m.update({f"train/{g}/episode_return": acting.mean_return(), f"train/{g}/epsilon": epsilon,
                      f"train/{g}/steps_per_s": steps_per_s, f"train/{g}/episodes": acting.episodes})
            if self.learner.updates:  # no loss before the first update (a NaN there is no divergence)
                m[f"train/{g}/loss"] = loss
        return m

    def card(self, run: Run, scores: Scores | None) -> dict:
        """The provenance written beside best.pt and last.pt."""
        return {"source": "multitask-dqn", "config": run.config_dict, "env_steps": self.env_steps,
                "updates": self.learner.updates, "parameters": self.counts, "teacher_scores": self.teacher_scores,
                "eval": scores.games if scores else None, "wall_time_s": round(run.clock.wall(), 1),
                "cpu_time_s": round(run.clock.cpu(), 1), "command": configlib.command_line()}

    def state_dict(self) -> dict[str, Any]:
        return {"learner": self.learner.state_dict(), "games": {g: a.state_dict() for g, a in zip(self.spec.games, self.acting)},
                "update_credit": self.update_credit, "last_loss": self.last_loss, "torch_rng": torch.get_rng_state(),
                "history": self.history, "best": self.best}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.learner.load_state_dict(saved["learner"])
        for g, acting in zip(self.spec.games, self.acting):
            acting.load_state_dict(saved["games"][g])
        torch.set_rng_state(saved["torch_rng"])
        self.update_credit, self.last_loss = saved["update_credit"], saved["last_loss"]
        self.history, self.best = saved["history"], saved["best"]

    def close(self) -> None:
        for acting in self.acting:
            acting.close()


def _train(dqn: MultitaskDQN, run: Run, show_progress: bool) -> None:
    """Every game acts, then learn, until total_steps_per_game; log, evaluate and checkpoint on
    schedule; episodes restart after each checkpoint (what makes a resume exact)."""
    cfg, start = dqn.cfg, dqn.env_steps
    dqn.begin_episodes()
    log_due, eval_due = Every(cfg.log_every, start), Every(cfg.eval_every, start)
    checkpoint_due, rate = Every(cfg.checkpoint_every, start), Rate(start)
    bar = Progress(cfg.total_steps_per_game, f"baseline {cfg.run_name}", unit="steps per game", initial=start,
                   enabled=show_progress)
    while dqn.env_steps < cfg.total_steps_per_game:
        epsilon = linear_schedule(cfg.eps_start, cfg.eps_end, cfg.eps_decay_steps, dqn.env_steps)
        dqn.act(epsilon)
        dqn.learn()
        bar.update(cfg.num_envs, postfix=f"eps {epsilon:.2f} updates {dqn.learner.updates:,}")
        last = dqn.env_steps >= cfg.total_steps_per_game
        if log_due(dqn.env_steps) or last:
            run.log(dqn.train_metrics(epsilon, rate(dqn.env_steps)), dqn.env_steps)
        if eval_due(dqn.env_steps) or last:
            periodic_evaluation(dqn, run, "multitask-dqn")
        if checkpoint_due(dqn.env_steps) or last:
            run.save_state(dqn)
            if not last:
                dqn.begin_episodes()
    bar.close()
    dqn.close()
