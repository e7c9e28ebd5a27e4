"""`multitask teacher train`: a DQN teacher for one game.

Reads top to bottom: set up -> resume -> (act, store, learn, log, evaluate, checkpoint)* -> pick
the best or last weights -> final evaluation -> write teachers/<suite>/<Game>.pt and its card. The
run folder (config, state.pt, metrics, W&B) is the shared one of `multitask.training.run`.

Defaults are the Nature-DQN setting for Atari (each cites its source); `configs/teacher/<suite>.toml`
holds the suite presets (MinAtar's are sized to train in ~30 minutes on 2 CPU cores).
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from multitask import config as configlib
from multitask.agents.checkpoints import save_agent
from multitask.agents.dqn import DQNConfig, DQNLearner, linear_schedule
from multitask.agents.networks import MultiHeadNet, count_parameters, teacher_network_spec
from multitask.config import option
from multitask.envs import GameSpec, get_game
from multitask.errors import UserError
from multitask.evaluation.protocol import evaluate_game
from multitask.progress import Progress
from multitask.training.acting import Acting
from multitask.devices import (CHANNELS_LAST_DOC, DEVICE_DOC, PRECISION_DOC, DeviceName, Precision, arrange,
                               pick_device)
from multitask.training.run import Every, Rate, Run
from multitask.training.scoring import PERIODIC_EVAL_SEED, score_games
from multitask.training.tracking import WandbMode

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
MIN_REPLAY_PER_ENV = 4  # agents/replay.ReplayMemory keeps >= 4 observations' frames per env (4 * stack)


@dataclass(frozen=True)
class TeacherConfig:
    seed: int = option(0, "seeds torch, the envs (seed + i) and the action/replay RNGs")
    total_steps: int = option(10_000_000, "env steps, summed over envs (CleanRL dqn_atari: 10M)")
    num_envs: int = option(8, "envs stepped together; actions chosen in one batched forward pass")
    width: float = option(1.0, "width multiplier of the Q-network (1.0 = Nature DQN / MinAtar DQN)")
    replay_capacity: int = option(1_000_000, "transitions in replay; each frame stored once (Mnih et al. 2015)")
    learning_starts: int = option(80_000, "env steps of experience before the first update (CleanRL dqn_atari)")
    update_ratio: float = option(0.25, "gradient updates per env step (Mnih et al. 2015: one per 4 steps)")
    eps_start: float = option(1.0, "initial exploration epsilon (Mnih et al. 2015)")
    eps_end: float = option(0.01, "final exploration epsilon (CleanRL dqn_atari)")
    eps_decay_steps: int = option(1_000_000, "env steps of linear epsilon decay (CleanRL: 10% of 10M)")
    life_loss_terminal: bool = option(True, "a lost life ends the training episode for bootstrapping (Mnih et al. 2015)")
    eval_every: int = option(250_000, "env steps between periodic evaluations (0: never)")
    eval_episodes: int = option(10, "episodes per periodic evaluation")
    final_eval_episodes: int = option(20, "episodes of the final evaluation written into the card")
    keep_best: bool = option(True, "the teacher is the best periodic-evaluation snapshot, not the last weights (DQN oscillates)")
    checkpoint_every: int = option(250_000, "env steps between resumable training checkpoints")
    log_every: int = option(20_000, "env steps between metric logs")
    num_threads: int = option(0, "torch CPU threads (0: torch's default)")
    device: DeviceName = option("auto", DEVICE_DOC)
    precision: Precision = option("fp32", PRECISION_DOC)
    channels_last: bool = option(False, CHANNELS_LAST_DOC)
    dqn: DQNConfig = option(DQNConfig(), "the DQN learner ([dqn] table)")

    def __post_init__(self):
        if self.num_envs < 1 or self.total_steps < 1:
            raise ValueError("num_envs and total_steps must be positive")
        if self.update_ratio <= 0 or self.width <= 0:
            raise ValueError("update_ratio and width must be positive")
        if min(self.seed, self.learning_starts, self.num_threads) < 0:
            raise ValueError("seed, learning_starts and num_threads must not be negative")
        if not (0.0 <= self.eps_start <= 1.0 and 0.0 <= self.eps_end <= 1.0):
            raise ValueError("eps_start and eps_end must be in [0, 1]")
        if self.final_eval_episodes < 1 or (self.eval_every > 0 and self.eval_episodes < 1):
            raise ValueError("final_eval_episodes, and eval_episodes when eval_every > 0, must be positive")
        if self.replay_capacity < MIN_REPLAY_PER_ENV * self.num_envs:
            raise ValueError(f"replay_capacity must hold at least {MIN_REPLAY_PER_ENV} frames per env "
                             f"({MIN_REPLAY_PER_ENV} * num_envs)")


def check_replay(cfg: TeacherConfig, game: GameSpec) -> None:
    """Refuse, in one sentence, a replay too small for num_envs envs of `game` (ReplayMemory keeps
    at least 4 stacked observations' frames per env; Atari stacks 4 frames)."""
    need = MIN_REPLAY_PER_ENV * game.stack * cfg.num_envs
    if cfg.replay_capacity < need:
        raise UserError(f"replay_capacity {cfg.replay_capacity:,} is too small for {cfg.num_envs} envs of "
                        f"{game.name}; give at least {need:,}")


def default_config_path(suite: str) -> Path:
    return CONFIG_DIR / "teacher" / f"{suite}.toml"


def load_config(suite: str, path: Path | None, overrides: list[str]) -> TeacherConfig:
    path = path or default_config_path(suite)
    return configlib.load(TeacherConfig, path, overrides)


# a killed run may be resumed with these changed
RESUMABLE_CHANGES = ("total_steps", "num_threads", "device", "precision", "channels_last")
RESUME_SEED_STRIDE = 7919  # a resumed run starts fresh episodes: env seeds seed + 7919 * resumes + i
EVAL_SEED_STRIDE = 100  # periodic evaluation i plays env seeds seed + 10_000 + 100 i + (0..31 envs)
FINAL_EVAL_SEED_OFFSET = 999_983  # the card's evaluation plays seeds no periodic evaluation played


def train_teacher(game_name: str, cfg: TeacherConfig, out: Path, run_dir: Path,
                  wandb_mode: WandbMode = "offline", restart: bool = False,
                  show_progress: bool = True) -> dict:
    game = get_game(game_name)
    check_replay(cfg, game)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = pick_device(cfg.device)
    cfg = replace(cfg, device=device.type)  # the config as built
    torch.manual_seed(cfg.seed)
    teacher = Teacher(game, cfg, device)
    run = Run(run_dir, cfg, step_metric="env_steps", identity={"game": game.name})
    run.resume(teacher, restart, may_differ=RESUMABLE_CHANGES, budget=("total_steps", cfg.total_steps, cfg.num_envs))
    if cfg.learning_starts >= cfg.total_steps:  # allowed (a play-only run), but rarely meant
        run.say(f"note: learning_starts={cfg.learning_starts:,} >= total_steps={cfg.total_steps:,}: the network is "
                f"never updated")
    run.start(wandb_mode, name=f"teacher-{game.name}", job_type="teacher", group="teachers",
              extra_config={"game": game.name})
    _train(teacher, run, show_progress)
    chosen = _pick_weights(teacher, run)
    final = evaluate_game(teacher.net, game, cfg.final_eval_episodes, seed=cfg.seed + FINAL_EVAL_SEED_OFFSET,
                          show_progress=show_progress)
    card = _card(teacher, run, chosen, final.to_dict())
    digest = save_agent(out, teacher.net, "teacher", card)
    run.log({f"eval/{game.name}/final_score": final.mean}, teacher.env_steps)
    run.finish({f"eval/{game.name}/final_score": final.mean, "teacher_sha256": digest})
    print(f"teacher {game.name}: score {final.mean:.2f} +/- {np.std(final.returns):.2f} over "
          f"{len(final.returns)} episodes, {teacher.env_steps:,} env steps, {run.clock.wall() / 60:.1f} min -> {out}")
    return card


class Teacher:
    """A DQN teacher in training: network, learner, its game's acting (envs, replay, exploration;
    `training/acting`), and the learning curve and best snapshot that state.pt carries."""

    def __init__(self, game: GameSpec, cfg: TeacherConfig, device: torch.device = torch.device("cpu")):
        self.game, self.cfg, self.device = game, cfg, device
        self.net = arrange(MultiHeadNet(teacher_network_spec(game, cfg.width)).to(device), cfg.channels_last)
        self.learner = DQNLearner(self.net, cfg.dqn, cfg.precision)
        self.acting = Acting(game, cfg.num_envs, cfg.replay_capacity, cfg.seed, cfg.life_loss_terminal)
        self.history: list[dict] = []  # periodic evaluations: the learning curve
        self.best = {"score": -float("inf"), "state_dict": None, "env_steps": 0}
        self.update_credit = 0.0
        self.last_loss: float | None = None  # None until this process's first update (not kept in state.pt)

    def learn(self) -> None:
        """update_ratio gradient updates per env step, once learning_starts steps are stored."""
        if self.env_steps < self.cfg.learning_starts:
            return
        self.update_credit += self.cfg.num_envs * self.cfg.update_ratio
        while self.update_credit >= 1.0:
            batch = self.acting.memory.sample(self.cfg.dqn.batch_size).to(self.device)
            self.last_loss = self.learner.update(batch)["loss"]
            self.update_credit -= 1.0

    @property
    def env_steps(self) -> int:
        return self.acting.env_steps

    @property
    def step(self) -> int:
        return self.env_steps

    def state_dict(self) -> dict:
        return {**self.acting.state_dict(), "learner": self.learner.state_dict(), "torch_rng": torch.get_rng_state(),
                "history": self.history, "best": self.best}

    def load_state_dict(self, saved: dict) -> None:
        self.learner.load_state_dict(saved["learner"])
        self.acting.load_state_dict(saved)
        torch.set_rng_state(saved["torch_rng"])
        self.history, self.best = saved["history"], saved["best"]


def _train(teacher: Teacher, run: Run, show_progress: bool) -> None:
    """Act, store and learn until total_steps, logging, evaluating and checkpointing on schedule."""
    cfg, game = teacher.cfg, teacher.game
    acting = teacher.acting
    acting.begin(cfg.seed + RESUME_SEED_STRIDE * run.resumes)
    log_due, eval_due = Every(cfg.log_every, teacher.env_steps), Every(cfg.eval_every, teacher.env_steps)
    checkpoint_due, rate = Every(cfg.checkpoint_every, teacher.env_steps), Rate(teacher.env_steps)
    bar = Progress(cfg.total_steps, f"teacher {game.name}", initial=teacher.env_steps, enabled=show_progress)
    while teacher.env_steps < cfg.total_steps:
        epsilon = linear_schedule(cfg.eps_start, cfg.eps_end, cfg.eps_decay_steps, teacher.env_steps)
        acting.act(teacher.net, 0, epsilon)
        teacher.learn()
        loss = teacher.last_loss  # None before the first update
        bar.update(cfg.num_envs, postfix=f"return {acting.mean_return():.1f} eps {epsilon:.2f} "
                                         + ("loss -" if loss is None else f"loss {loss:.4f}"))
        if log_due(teacher.env_steps):
            prefix = f"train/{game.name}"
            metrics = {f"{prefix}/episode_return": acting.mean_return(), f"{prefix}/epsilon": epsilon,
                       f"{prefix}/updates": teacher.learner.updates, f"{prefix}/episodes": acting.episodes,
                       f"{prefix}/steps_per_s": rate(teacher.env_steps)}
            if loss is not None:
                metrics[f"{prefix}/loss"] = loss
            run.log(metrics, teacher.env_steps)
        if eval_due(teacher.env_steps):
            _evaluate(teacher, run)
        if checkpoint_due(teacher.env_steps) or teacher.env_steps >= cfg.total_steps:
            run.save_state(teacher)
    bar.close()
    acting.close()


def _evaluate(teacher: Teacher, run: Run) -> float:
    """A periodic evaluation: logged, printed, added to the learning curve, kept if the best."""
    cfg, game = teacher.cfg, teacher.game
    seed = cfg.seed + PERIODIC_EVAL_SEED + EVAL_SEED_STRIDE * len(teacher.history)
    scores = score_games(teacher.net, [game.name], cfg.eval_episodes, seed, 1, {}, teacher.device)
    score = scores.means[game.name]
    teacher.history.append({"env_steps": teacher.env_steps, "mean": score, "wall_time_s": run.clock.wall()})
    run.report_evaluation(scores.metrics(), scores.line(), teacher.env_steps)
    if score >= teacher.best["score"]:
        teacher.best = {"score": score, "env_steps": teacher.env_steps,
                        "state_dict": {k: v.clone() for k, v in teacher.net.state_dict().items()}}
        # the best so far, published in the run folder for online distillation (`student drive follow=true`)
        run.save_agent("best", teacher.net, "teacher", {"source": "training", "game": game.describe(),
                                                        "env_steps": teacher.env_steps, "eval": {"mean": score},
                                                        "config": run.config_dict})
    return score


def _pick_weights(teacher: Teacher, run: Run) -> str:
    """Keep the last weights, or (keep_best) the best periodic snapshot if the last weights score
    below it on one more evaluation: DQN's score oscillates. Says which."""
    if not teacher.cfg.keep_best or teacher.best["state_dict"] is None:
        return "last"
    last = _evaluate(teacher, run)
    if teacher.best["score"] <= last:
        return "last"
    teacher.net.load_state_dict(teacher.best["state_dict"])
    return f"best periodic evaluation (env step {teacher.best['env_steps']:,})"


def _card(teacher: Teacher, run: Run, weights: str, evaluation: dict) -> dict:
    """The provenance written beside the teacher checkpoint."""
    return {
        "source": "trained", "game": teacher.game.describe(), "config": run.config_dict,
        "command": configlib.command_line(), "env_steps": teacher.env_steps, "updates": teacher.learner.updates,
        "episodes": teacher.acting.episodes, "wall_time_s": round(run.clock.wall(), 1),
        "cpu_time_s": round(run.clock.cpu(), 1), "resumes": run.resumes,
        "weights": weights, "parameters": count_parameters(teacher.net),
        "eval": evaluation, "learning_curve": teacher.history,
        "machine": {"platform": platform.platform(), "cpu_threads": torch.get_num_threads(),
                    "device": torch.cuda.get_device_name() if teacher.device.type == "cuda" else "cpu"},
    }
