"""`multitask teacher train`: a DQN teacher for one game.

Reads top to bottom: set up -> resume -> (act, step, store, learn, log, evaluate, checkpoint)* ->
final evaluation -> write teachers/<suite>/<Game>.pt and its card.

Defaults are the Nature-DQN setting for Atari (each cites its source); `configs/teacher/<suite>.toml`
holds the suite presets (MinAtar's are sized to train in ~30 minutes on 2 CPU cores).
"""

from __future__ import annotations

import json
import platform
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from multitask import config as configlib
from multitask.agents.checkpoints import save_agent
from multitask.files import atomic_torch_save, atomic_write_text
from multitask.config import option
from multitask.agents.dqn import DQNConfig, DQNLearner, epsilon_greedy, linear_schedule
from multitask.envs import get_game, make_vector_env
from multitask.errors import UserError
from multitask.evaluation.protocol import evaluate_game
from multitask.agents.networks import MultiHeadNet, count_parameters, teacher_network_spec
from multitask.progress import Progress
from multitask.agents.replay import ReplayMemory
from multitask.training.tracking import Tracker, WandbMode

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


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
    dqn: DQNConfig = option(DQNConfig(), "the DQN learner ([dqn] table)")

    def __post_init__(self):
        if self.num_envs < 1 or self.total_steps < 1:
            raise ValueError("num_envs and total_steps must be positive")
        if self.update_ratio <= 0:
            raise ValueError("update_ratio must be positive")


def default_config_path(suite: str) -> Path:
    return CONFIG_DIR / "teacher" / f"{suite}.toml"


def load_config(suite: str, path: Path | None, overrides: list[str]) -> TeacherConfig:
    path = path or default_config_path(suite)
    return configlib.load(TeacherConfig, path, overrides)


def _resume_mismatch(saved: dict, current: dict) -> str | None:
    """Name the first config key that differs (total_steps may grow on resume)."""
    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flat(v, prefix + k + ".")
            else:
                yield prefix + k, v
    s, c = dict(flat(saved)), dict(flat(current))
    for key in sorted(set(s) | set(c)):
        if key not in ("total_steps", "num_threads") and s.get(key) != c.get(key):
            return key
    return None


def train_teacher(game_name: str, cfg: TeacherConfig, out: Path, run_dir: Path,
                  wandb_mode: WandbMode = "offline", restart: bool = False,
                  show_progress: bool = True) -> dict:
    # ---- Phase 1: set up game, networks, learner, replay, envs -------------------------------
    game = get_game(game_name)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    net = MultiHeadNet(teacher_network_spec(game, cfg.width))
    learner = DQNLearner(net, cfg.dqn)
    memory = ReplayMemory(cfg.replay_capacity, cfg.num_envs, game.frame_shape, game.stack, seed=cfg.seed)
    rng = np.random.default_rng(cfg.seed + 1)
    cfg_dict = configlib.to_dict(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    state_path = run_dir / "state.pt"
    env_steps, episodes, resumes, wall_before, cpu_before = 0, 0, 0, 0.0, 0.0
    recent = deque(maxlen=20)  # raw whole-game returns of the last finished episodes
    history: list[dict] = []  # periodic evaluations: the learning curve
    best = {"score": -float("inf"), "state_dict": None, "env_steps": 0}
    wandb_id = None

    # ---- Phase 2: resume a killed run from its last checkpoint ---------------------------------
    if state_path.exists() and restart:
        state_path.unlink()
    if state_path.exists():
        try:
            saved = torch.load(state_path, map_location="cpu", weights_only=True)
        except Exception as e:  # a torn file cannot happen (atomic writes) but a foreign one can
            raise UserError(f"cannot read training checkpoint {state_path} ({type(e).__name__}); "
                            f"pass --restart to start over") from None
        if saved["game"] != game.name:
            raise UserError(f"run dir {run_dir} holds a run for {saved['game']}, not {game.name}; "
                            f"use another --run-dir")
        key = _resume_mismatch(saved["config"], cfg_dict)
        if key:
            raise UserError(f"run dir {run_dir} holds a run with a different config (key '{key}' "
                            f"differs); pass --restart to start over or use another --run-dir")
        learner.load_state_dict(saved["learner"])
        memory.load_state_dict(saved["replay"])
        memory.rng.bit_generator.state = saved["replay_rng"]
        rng.bit_generator.state = saved["action_rng"]
        torch.set_rng_state(saved["torch_rng"])
        env_steps, episodes = saved["env_steps"], saved["episodes"]
        resumes, wall_before = saved["resumes"] + 1, saved["wall_time_s"]
        cpu_before = saved.get("cpu_time_s", 0.0)
        recent.extend(saved["recent_returns"])
        history, best, wandb_id = saved["history"], saved["best"], saved["wandb_id"]
        print(f"resuming {game.name} from {state_path} at env step {env_steps:,}", file=sys.stderr)
    atomic_write_text(run_dir / "config.toml", configlib.to_toml(cfg))
    tracker = Tracker(wandb_mode, run_dir, name=f"teacher-{game.name}", job_type="teacher",
                      config={"game": game.name, **cfg_dict}, run_id=wandb_id, group="teachers")
    metrics_log = open(run_dir / "metrics.jsonl", "a")
    env = make_vector_env(game, cfg.num_envs)
    obs = env.reset(cfg.seed + 7919 * resumes)  # a resumed run starts fresh episodes
    memory.begin_episodes(obs)
    ep_return = np.zeros(cfg.num_envs)
    t_start, cpu_start = time.perf_counter(), time.process_time()

    def wall_time() -> float:
        return wall_before + time.perf_counter() - t_start

    def cpu_time() -> float:  # all threads of this process (evaluations included)
        return cpu_before + time.process_time() - cpu_start

    def save_state() -> None:
        atomic_torch_save({
            "game": game.name, "config": cfg_dict, "env_steps": env_steps, "episodes": episodes,
            "resumes": resumes, "wall_time_s": wall_time(), "cpu_time_s": cpu_time(),
            "learner": learner.state_dict(),
            "replay": memory.state_dict(), "replay_rng": memory.rng.bit_generator.state,
            "action_rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
            "recent_returns": list(recent), "history": history, "best": best, "wandb_id": tracker.run_id,
        }, state_path)

    def log(metrics: dict) -> None:
        tracker.log(metrics, env_steps)
        metrics_log.write(json.dumps({"env_steps": env_steps, **metrics}) + "\n")
        metrics_log.flush()

    # ---- Phase 3: act, store, learn ---------------------------------------------------------
    prefix = f"train/{game.name}"
    bar = Progress(cfg.total_steps, f"teacher {game.name}", initial=env_steps, enabled=show_progress)
    update_credit, last_loss, steps_at_log, time_at_log = 0.0, float("nan"), env_steps, time.perf_counter()
    next_log = (env_steps // cfg.log_every + 1) * cfg.log_every
    next_eval = (env_steps // cfg.eval_every + 1) * cfg.eval_every if cfg.eval_every else None
    next_ckpt = (env_steps // cfg.checkpoint_every + 1) * cfg.checkpoint_every
    while env_steps < cfg.total_steps:
        epsilon = linear_schedule(cfg.eps_start, cfg.eps_end, cfg.eps_decay_steps, env_steps)
        with torch.no_grad():
            q = net(torch.from_numpy(obs), 0)
        actions = epsilon_greedy(q, epsilon, rng)
        step = env.step(actions)
        terminal = step.life_lost if cfg.life_loss_terminal else step.terminated
        memory.add(actions, step.reward, terminal, step.next_obs, step.done, step.obs)
        ep_return += step.reward
        for i in np.flatnonzero(step.done):
            recent.append(float(ep_return[i]))
            ep_return[i] = 0.0
            episodes += 1
        obs = step.obs
        env_steps += cfg.num_envs
        bar.update(cfg.num_envs, postfix=f"return {np.mean(recent) if recent else float('nan'):.1f} "
                                         f"eps {epsilon:.2f} loss {last_loss:.4f}")

        if env_steps >= cfg.learning_starts:
            update_credit += cfg.num_envs * cfg.update_ratio
            while update_credit >= 1.0:
                last_loss = learner.update(memory.sample(cfg.dqn.batch_size))["loss"]
                update_credit -= 1.0

        if env_steps >= next_log:
            next_log += cfg.log_every
            now = time.perf_counter()
            sps = (env_steps - steps_at_log) / (now - time_at_log)
            steps_at_log, time_at_log = env_steps, now
            log({f"{prefix}/episode_return": float(np.mean(recent)) if recent else float("nan"),
                 f"{prefix}/loss": last_loss, f"{prefix}/epsilon": epsilon,
                 f"{prefix}/updates": learner.updates, f"{prefix}/episodes": episodes,
                 f"{prefix}/steps_per_s": sps})

        if next_eval is not None and env_steps >= next_eval:
            next_eval += cfg.eval_every
            scores = evaluate_game(net, game, cfg.eval_episodes, seed=cfg.seed + 10_000 + len(history) * 100)
            history.append({"env_steps": env_steps, "mean": scores.mean, "wall_time_s": wall_time()})
            log({f"eval/{game.name}/score": scores.mean})
            if scores.mean >= best["score"]:
                best = {"score": scores.mean, "env_steps": env_steps,
                        "state_dict": {k: v.clone() for k, v in net.state_dict().items()}}

        if env_steps >= next_ckpt or env_steps >= cfg.total_steps:
            next_ckpt += cfg.checkpoint_every
            save_state()
    bar.close()
    env.close()

    # ---- Phase 4: pick the teacher, evaluate it once more, write it with its card -------------
    final_state = {k: v.clone() for k, v in net.state_dict().items()}
    chosen = "last"
    if cfg.keep_best and best["state_dict"] is not None:
        last = evaluate_game(net, game, cfg.eval_episodes, seed=cfg.seed + 10_000 + len(history) * 100)
        history.append({"env_steps": env_steps, "mean": last.mean, "wall_time_s": wall_time()})
        if best["score"] > last.mean:
            net.load_state_dict(best["state_dict"])
            chosen = f"best periodic evaluation (env step {best['env_steps']:,})"
    final = evaluate_game(net, game, cfg.final_eval_episodes, seed=cfg.seed + 999_983, show_progress=show_progress)
    card = {
        "source": "trained", "game": game.describe(), "config": cfg_dict,
        "command": configlib.command_line(), "env_steps": env_steps, "updates": learner.updates,
        "episodes": episodes, "wall_time_s": round(wall_time(), 1), "cpu_time_s": round(cpu_time(), 1),
        "resumes": resumes,
        "weights": chosen, "parameters": count_parameters(net),
        "eval": final.to_dict(), "learning_curve": history,
        "machine": {"platform": platform.platform(), "cpu_threads": torch.get_num_threads()},
    }
    digest = save_agent(out, net, "teacher", card)
    net.load_state_dict(final_state)
    tracker.summary({f"eval/{game.name}/final_score": final.mean, "teacher_sha256": digest})
    log({f"eval/{game.name}/final_score": final.mean})
    tracker.finish()
    metrics_log.close()
    print(f"teacher {game.name}: score {final.mean:.2f} +/- {np.std(final.returns):.2f} over "
          f"{len(final.returns)} episodes, {env_steps:,} env steps, {wall_time() / 60:.1f} min -> {out}")
    return card
