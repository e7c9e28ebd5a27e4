"""`multitask student drive`: student-driven distillation, online (paper B on networks).

The student acts in every game's vector envs (or a teacher/student mixture: each step, each env
takes the teacher's action with probability `teacher_share`, decaying linearly to 0 over
`teacher_share_decay_steps`); the teacher labels every visited state with its raw Q-values; every
`rollout` steps per env, `updates_per_rollout` updates with the unified rule of training/unified.py
and the chosen variant, each game's loss weighing the same. Same networks, size presets, evaluation protocol,
run scaffolding and exact resume as the other trainers.

Pseudo-returns are sums over the rollout, truncated at its end (no bootstrap: the student has no
value head), except the teacher V reward's, which bootstraps on the teacher's value of the state
after the rollout; with gamma 0.9 a step 32 steps on weighs 0.9^32 = 3%. The baseline is a per-game
running mean of the pseudo-returns. Under a mixture control the score function is the mixture's
(unified.control_log_probs). The `updates_per_rollout` updates on one rollout reuse it as it was
played, with no importance ratio: past the first, the policy-gradient term is slightly off-policy
(1 keeps it exact). Each checkpoint restarts every env's episode with seeds fixed
by the checkpoint count (as the multi-task DQN does), so a killed run resumes to the same weights.

Run folder: runs/driven/<name>/ with config.toml, state.pt, best.pt / last.pt, metrics.jsonl,
summary.json, table.md, wandb/.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch

from multitask import config as configlib
from multitask.agents.checkpoints import load_teacher
from multitask.agents.networks import MultiHeadNet, NetworkSpec, pad_channels
from multitask.agents.sizes import SizePreset, sized_network
from multitask.config import option
from multitask.envs import GameSpec
from multitask.errors import UserError
from multitask.files import file_sha256
from multitask.progress import Progress
from multitask.training import unified as u
from multitask.training.acting import RECENT_EPISODES, GamePlay
from multitask.training.following import keep_pace, teacher_run_progress, wait_for_teachers
from multitask.training.baseline import GAME_SEED_STRIDE, RESTART_SEED_STRIDE, resolve_games  # the same episode seeds
from multitask.devices import DEVICE_DOC, DeviceName, pick_device
from multitask.training.losses import DEFAULT_TAU
from multitask.training.run import Every, Rate, Run, default_run_name
from multitask.training.evaluating import final_evaluation, periodic_evaluation
from multitask.training.scoring import Scores, teacher_card_scores
from multitask.training.tracking import WandbMode

RESUMABLE_CHANGES = ("total_steps_per_game", "num_threads", "eval_workers", "device")


@dataclass(frozen=True)
class DrivenConfig:
    games: tuple[str, ...] = option((), "games, one head each, all of one suite")
    teachers: tuple[str, ...] = option((), "teacher per game (default: teachers/<suite>/<Game>.pt)")
    name: str = option("", "run name (default: derived from games, variant, size and seed)")
    seed: int = option(0, "seeds the student, every env and the action sampling")
    variant: str = option("expected_entropy_regularised", "unified-update variant (training/unified.VARIANTS; '+R' adds "
                          "the game reward); paper B recommends expected entropy regularised in general")
    tau: float = option(DEFAULT_TAU, "teacher policy softmax(q / tau) (paper A's 0.01; 0: greedy)")
    teacher_share: float = option(0.0, "chance per step that an env takes the teacher's action (a mixture control); "
                                       "the variant's control policy when 0")
    teacher_share_decay_steps: int = option(0, "env steps per game over which teacher_share decays linearly to 0 "
                                               "(0: constant)")
    size: SizePreset = option("100%", "student size, as the offline students'")
    width: float = option(1.0, "trunk width multiplier for size = custom")
    extra_fc: int = option(0, "extra hidden FC layers for size = custom")
    num_envs: int = option(8, "envs per game, stepped together")
    rollout: int = option(32, "steps per env between updates; pseudo-returns are truncated at its end")
    updates_per_rollout: int = option(4, "updates on each rollout (1: every label used once; the offline students "
                                         "use each of theirs 6.4-12.8 times)")
    gamma: float = option(0.9, "pseudo-return discount (paper B: 0.99; 0.9 measured better on grids, docs/gridworld.md)")
    reward_clip: bool | None = option(None, "clip the game rewards that +R and the teacher V reward add to [-1, 1] "
                                            "(unset: as the suite's DQN teachers learnt them, so on the scale of "
                                            "their V: Atari yes, MinAtar no; saved configs hold the choice)",
                                     absent=False)  # runs saved before the key existed did not clip
    baseline_rate: float = option(0.01, "rate of each game's running-mean baseline of the pseudo-returns")
    optimizer: Literal["adam", "rmsprop"] = option("adam", "optimiser")
    lr: float = option(1e-3, "learning rate (the offline students': 1e-3)")
    total_steps_per_game: int = option(200_000, "env steps per game, each one teacher-labelled (the offline "
                                                "students' datasets hold 200,000)")
    eval_every: int = option(50_000, "env steps per game between evaluations")
    eval_episodes: int = option(20, "episodes per game in periodic evaluations")
    final_eval_episodes: int = option(100, "episodes per game in the final evaluation of best.pt and the teachers")
    eval_workers: int = option(2, "processes evaluating games in parallel")
    checkpoint_every: int = option(25_000, "env steps per game between resumable checkpoints")
    log_every: int = option(5_000, "env steps per game between metric logs")
    follow: bool = option(False, "online distillation (paper A): reload each game's teacher whenever its file changes; "
                                 "point `teachers` at a training teacher's runs/teacher/<run>/best.pt")
    follow_every: int = option(5_000, "env steps per game between checks for a newer teacher when following")
    follow_pace: float = option(0.0, "when following: teacher-labelled env steps per game the student may take per "
                                     "env step its teacher run has logged (it waits otherwise), so that its curve "
                                     "spans the teacher's training; 0: no waiting")
    num_threads: int = option(1, "torch CPU threads (0: torch's default; one leaves the other core to the envs)")
    device: DeviceName = option("auto", DEVICE_DOC)

    def __post_init__(self):
        if not self.games:
            raise ValueError("name at least one game in `games`")
        if len(set(self.games)) != len(self.games):
            raise ValueError("name each game once in `games`")
        if self.teachers and len(self.teachers) != len(self.games):
            raise ValueError("`teachers` needs one path per game")
        variant, plus_reward = u.parse_variant(self.variant)
        if variant.value_gate:
            raise ValueError(f"{self.variant} needs the student's state values; network students have no value head")
        if not 0.0 <= self.teacher_share <= 1.0:
            raise ValueError("teacher_share is a probability")
        if self.teacher_share_decay_steps < 0:
            raise ValueError("teacher_share_decay_steps must not be negative (0: a constant teacher_share)")
        if self.teacher_share_decay_steps and not self.teacher_share:
            raise ValueError("teacher_share_decay_steps decays teacher_share, which is 0; give teacher_share too")
        if variant.control == "teacher" and (self.teacher_share or self.teacher_share_decay_steps):
            raise ValueError(f"{self.variant} plays the teacher's action at every step; drop teacher_share")
        if (self.teacher_share == 1.0 and not self.teacher_share_decay_steps
                and (variant.pseudo_reward != "none" or plus_reward)):
            raise ValueError(f"{self.variant} with teacher_share = 1: the teacher plays every step, so its "
                             f"policy-gradient terms have no gradient; lower teacher_share or decay it")
        if not 0.0 <= self.baseline_rate <= 1.0:
            raise ValueError("baseline_rate must be in [0, 1]")
        if self.checkpoint_every < 1 or (self.follow and self.follow_every < 1):
            raise ValueError("checkpoint_every (and follow_every when following) must be positive")
        if min(self.eval_every, self.log_every) < 0:
            raise ValueError("eval_every and log_every must not be negative (0: only at the end)")
        if not self.width > 0 or self.extra_fc < 0:
            raise ValueError("width must be positive and extra_fc not negative")
        if not (math.isfinite(self.tau) and math.isfinite(self.lr)):
            raise ValueError("tau and lr must be finite numbers")
        if self.follow_pace < 0:
            raise ValueError("follow_pace is a ratio of env steps, not negative")
        if min(self.num_envs, self.rollout, self.total_steps_per_game, self.updates_per_rollout) < 1 or self.lr <= 0 or self.tau < 0:
            raise ValueError("num_envs, rollout, total_steps_per_game and lr must be positive, tau not negative")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError("gamma must be in [0, 1]")
        if min(self.eval_episodes, self.final_eval_episodes) < 1:
            raise ValueError("eval_episodes and final_eval_episodes must be positive")
        if min(self.seed, self.num_threads) < 0:
            raise ValueError("seed and num_threads must not be negative")

    @property
    def run_name(self) -> str:
        return self.name or default_run_name(self.games, self.variant.replace("_", "-").replace("+R", "-plusR"),
                                             self.size, self.seed)


def train_driven(cfg: DrivenConfig, run_dir: Path | None = None, wandb_mode: WandbMode = "offline",
                 restart: bool = False, show_progress: bool = True) -> dict:
    games, teacher_paths = resolve_games(cfg, listed_exist=not cfg.follow)  # a followed teacher is waited for
    if cfg.follow:
        wait_for_teachers(teacher_paths)
    teachers = [_load_teacher(p, g) for p, g in zip(teacher_paths, games)]
    spec, size = sized_network(cfg.size, games, cfg.width, cfg.extra_fc)
    device = pick_device(cfg.device)
    clip = games[0].suite == "atari" if cfg.reward_clip is None else cfg.reward_clip
    cfg = replace(cfg, width=spec.trunk.width, extra_fc=spec.trunk.extra_fc, device=device.type,
                  reward_clip=clip)  # as built
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    # the teachers label every state, so a resume must find the same files (a followed teacher changes by design)
    labels = {} if cfg.follow else {"teachers": {g.name: file_sha256(p) for g, p in zip(games, teacher_paths)}}
    run = Run(run_dir or Path("runs") / "driven" / cfg.run_name, cfg, step_metric="env_steps",
              identity={"network": spec, **labels})
    learner = Driven(spec, cfg, games, teachers, device, size.counts("student"), teacher_card_scores(teacher_paths, games))
    learner.teacher_paths = teacher_paths
    learner.follow_teachers()
    run.say(learner.describe())
    run.resume(learner, restart, may_differ=RESUMABLE_CHANGES,
               budget=("total_steps_per_game", cfg.total_steps_per_game, cfg.rollout * cfg.num_envs))
    run.start(wandb_mode, name=f"driven-{cfg.run_name}", job_type="driven", group="students",
              extra_config={"parameters": learner.counts})
    _train(learner, run, show_progress)
    return final_evaluation(learner, run, teacher_paths, "student", "student-driven", "driven")


def _load_teacher(path: Path, game: GameSpec) -> MultiHeadNet:
    if not path.is_file():
        raise UserError(f"no teacher for {game.name} at {path}; student-driven distillation needs one to label "
                        f"every state (list its path in `teachers`)")
    return load_teacher(path, game)[0].net.eval()


class Driven:
    """The student in training, its teachers and envs, and what state.pt carries."""

    def __init__(self, spec: NetworkSpec, cfg: DrivenConfig, games: list[GameSpec], teachers: list[MultiHeadNet],
                 device: torch.device, counts: dict, teacher_scores: dict[str, float | None]):
        self.spec, self.cfg, self.games, self.counts, self.teacher_scores = spec, cfg, games, counts, teacher_scores
        self.variant, self.plus_reward = u.parse_variant(cfg.variant)
        torch.manual_seed(cfg.seed)
        self.device = device
        self.net = MultiHeadNet(spec).to(device)
        self.teachers = [t.to(device) for t in teachers]
        self.teacher_paths: list[Path] = []  # set by train_driven; followed when cfg.follow
        self.teacher_stamps: list[tuple[int, int] | None] = [None] * len(games)
        self.teacher_env_steps: list[int | None] = [None] * len(games)  # the followed teacher's training steps
        self.teacher_reloads = 0
        optimizer = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.RMSprop
        self.optimizer = optimizer(self.net.parameters(), lr=cfg.lr)
        self.gen = torch.Generator().manual_seed(cfg.seed + 1)  # actions and mixture coins, on the CPU
        self.envs = [GamePlay(g, cfg.num_envs) for g in games]
        self.env_steps, self.updates = 0, 0
        self.baselines = [0.0] * len(games)
        self.last = [{} for _ in games]  # the latest update's per-game metrics
        self.played_share = self.teacher_share()  # the teacher share the latest rollout was played at
        self.history: list[dict] = []
        self.best = {"score": -float("inf"), "env_steps": 0}

    def describe(self) -> str:
        c, cfg = self.counts, self.cfg
        mix = f", teacher share {cfg.teacher_share}" if cfg.teacher_share else ""
        return (f"student-driven {', '.join(self.spec.games)}: {c['student']:,} parameters, variant {cfg.variant} "
                f"(teacher tau {cfg.tau}{mix}), {cfg.num_envs} envs x {cfg.rollout} steps per update, on {cfg.device}")

    @property
    def step(self) -> int:
        return self.env_steps

    def follow_teachers(self) -> None:
        """Load every teacher file that changed since it was last read (size and mtime), when following."""
        if not self.cfg.follow:
            return
        for g, (path, game) in enumerate(zip(self.teacher_paths, self.games)):
            st = path.stat()
            stamp = (st.st_size, st.st_mtime_ns)
            if stamp == self.teacher_stamps[g]:
                continue
            agent, _ = load_teacher(path, game)  # written atomically (rename): never half a file
            self.teachers[g] = agent.net.eval().to(self.device)
            self.teacher_stamps[g] = stamp
            self.teacher_env_steps[g] = agent.card.get("env_steps")
            # periodic % of teacher is of the teacher followed now, not of the first one read
            self.teacher_scores[game.name] = (agent.card.get("eval") or {}).get("mean")
            self.teacher_reloads += 1

    def curve_extra(self) -> dict[str, Any]:
        """What a learning-curve point adds when following: each teacher's training env steps."""
        if not self.cfg.follow:
            return {}
        return {"teacher_env_steps": dict(zip(self.spec.games, self.teacher_env_steps)),  # of the snapshot read
                "teacher_run_steps": {game: teacher_run_progress(path.parent)[0]  # the teacher's training now
                                      for game, path in zip(self.spec.games, self.teacher_paths)}}

    def teacher_share(self) -> float:
        cfg = self.cfg
        if self.variant.control == "teacher":
            return 1.0
        if not cfg.teacher_share_decay_steps:
            return cfg.teacher_share
        return cfg.teacher_share * max(0.0, 1.0 - self.env_steps / cfg.teacher_share_decay_steps)

    def begin_episodes(self) -> None:
        k = self.env_steps // self.cfg.checkpoint_every
        for g, envs in enumerate(self.envs):
            envs.begin(self.cfg.seed + GAME_SEED_STRIDE * g + RESTART_SEED_STRIDE * k)

    def learn(self) -> None:
        """Play `rollout` steps in every game, then `updates_per_rollout` updates on the unified loss
        of all games over that rollout."""
        rollouts = [self._play(g) for g in range(len(self.games))]
        self.played_share = rollouts[0]["teacher_share"]
        for _ in range(self.cfg.updates_per_rollout):
            loss = torch.stack([self._game_loss(g, r) for g, r in enumerate(rollouts)]).mean()
            if not loss.requires_grad:  # a policy-gradient-only variant on a rollout the teacher played throughout
                continue  # (teacher_share 1 at the start of its decay): nothing depends on the weights
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.updates += 1
        for g in range(len(rollouts)):  # the baseline follows the pseudo-returns of each rollout once
            self.baselines[g] += self.cfg.baseline_rate * (self.last[g]["pseudo_return"] - self.baselines[g])
        self.env_steps += self.cfg.rollout * self.cfg.num_envs

    def _play(self, g: int) -> dict[str, Any]:
        """`rollout` steps of game g's envs under the control policy; what the update needs, (T, N, ...)
        tensors and the teacher share they were played at."""
        cfg, envs, teacher = self.cfg, self.envs[g], self.teachers[g]
        share = self.teacher_share()
        rows: dict[str, list] = {k: [] for k in ("obs", "teacher_log", "teacher_value", "actions", "rewards", "alive_next")}
        with torch.no_grad():
            for _ in range(cfg.rollout):
                obs = torch.from_numpy(envs.obs).to(self.device)
                student = torch.softmax(self.net(pad_channels(obs, self.spec.trunk.in_channels), g).double(), -1)
                q = teacher(obs).double()
                teacher_log = u.teacher_log_probs(q, cfg.tau)
                teacher_value = u.policy_value(teacher_log, q)
                student_pick = torch.multinomial(student.cpu(), 1, generator=self.gen).squeeze(-1)
                teacher_pick = torch.multinomial(teacher_log.exp().cpu(), 1, generator=self.gen).squeeze(-1)
                if self.variant.control == "uniform":
                    student_pick = torch.randint(q.shape[-1], student_pick.shape, generator=self.gen)
                use_teacher = torch.rand(len(student_pick), generator=self.gen) < share
                actions = torch.where(use_teacher, teacher_pick, student_pick)
                step = envs.step(actions.numpy())
                reward, done = step.reward, step.done
                if cfg.reward_clip:  # the scale the teachers' values were learnt on (reward_clip)
                    reward = reward.clip(-1.0, 1.0)
                for k, v in (("obs", obs), ("teacher_log", teacher_log), ("teacher_value", teacher_value),
                             ("actions", actions.to(self.device)),
                             ("rewards", torch.from_numpy(reward).double().to(self.device)),
                             ("alive_next", torch.from_numpy(~done).to(self.device))):
                    rows[k].append(v)
            out = {k: torch.stack(v) for k, v in rows.items()}
            if self.variant.pseudo_reward == "teacher_value":  # V_pi after the last step bootstraps the window
                q = teacher(torch.from_numpy(envs.obs).to(self.device)).double()
                out["next_value"] = u.policy_value(u.teacher_log_probs(q, cfg.tau), q)
        out["teacher_share"] = share
        return out

    def _game_loss(self, g: int, t: dict[str, Any]) -> torch.Tensor:
        """The unified surrogate loss of game g's rollout under the current weights."""
        steps, n = t["actions"].shape
        logits = self.net(pad_channels(t["obs"].flatten(0, 1), self.spec.trunk.in_channels), g)
        student_log = torch.log_softmax(logits.double(), -1).view(steps, n, -1)
        baseline = torch.full((steps, n), self.baselines[g], dtype=student_log.dtype, device=student_log.device)
        loss, step_loss, returns = u.variant_loss(self.variant, self.plus_reward, t["teacher_log"], student_log,
                                                  t["actions"], torch.ones_like(t["alive_next"]), t["alive_next"],
                                                  t["rewards"], t["teacher_value"], baseline, self.cfg.gamma,
                                                  teacher_share=t["teacher_share"],
                                                  next_value=t.get("next_value"))
        self.last[g] = {"loss": loss.item(), "step_loss": step_loss.mean().item(), "pseudo_return": returns.mean().item()}
        return loss

    def train_metrics(self, steps_per_s: float) -> dict[str, float]:
        m: dict[str, float] = {"train/updates": self.updates, "train/teacher_share": self.played_share,
                               "train/steps_per_s": steps_per_s}
        if self.cfg.follow:
            m["train/teacher_reloads"] = self.teacher_reloads
            m.update({f"train/{g}/teacher_env_steps": s for g, s in zip(self.spec.games, self.teacher_env_steps)
                      if s is not None})
        for game, envs, last in zip(self.spec.games, self.envs, self.last):
            m.update({f"train/{game}/episode_return": envs.mean_return(), f"train/{game}/episodes": envs.episodes,
                      **{f"train/{game}/{k}": v for k, v in last.items()}})
        return m

    def card(self, run: Run, scores: Scores | None) -> dict:
        return {"source": "student-driven", "config": run.config_dict, "env_steps": self.env_steps,
                "updates": self.updates, "parameters": self.counts, "teacher_scores": self.teacher_scores,
                "eval": scores.games if scores else None, "wall_time_s": round(run.clock.wall(), 1),
                "command": configlib.command_line()}

    def state_dict(self) -> dict[str, Any]:
        return {"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict(), "gen": self.gen.get_state(),
                "env_steps": self.env_steps, "updates": self.updates, "baselines": self.baselines,
                "episodes": [e.episodes for e in self.envs], "recent": [list(e.recent) for e in self.envs],
                "history": self.history, "best": self.best}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.net.load_state_dict(saved["net"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.gen.set_state(saved["gen"])
        self.env_steps, self.updates, self.baselines = saved["env_steps"], saved["updates"], saved["baselines"]
        for e, n, recent in zip(self.envs, saved["episodes"], saved["recent"]):
            e.episodes, e.recent = n, deque(recent, maxlen=RECENT_EPISODES)
        self.history, self.best = saved["history"], saved["best"]

    def close(self) -> None:
        for e in self.envs:
            e.close()


def _train(learner: Driven, run: Run, show_progress: bool) -> None:
    """Play and update until total_steps_per_game; log, evaluate and checkpoint on schedule;
    episodes restart after each checkpoint (what makes a resume exact)."""
    cfg, start = learner.cfg, learner.env_steps
    learner.begin_episodes()
    log_due, eval_due = Every(cfg.log_every, start), Every(cfg.eval_every, start)
    checkpoint_due, rate = Every(cfg.checkpoint_every, start), Rate(start)
    follow_due = Every(cfg.follow_every, start)
    bar = Progress(cfg.total_steps_per_game, f"driven {cfg.run_name}", unit="steps per game", initial=start,
                   enabled=show_progress)
    while learner.env_steps < cfg.total_steps_per_game:
        learner.learn()
        bar.update(cfg.rollout * cfg.num_envs)
        if follow_due(learner.env_steps):
            keep_pace(learner)
            learner.follow_teachers()
        last = learner.env_steps >= cfg.total_steps_per_game
        if log_due(learner.env_steps) or last:
            run.log(learner.train_metrics(rate(learner.env_steps)), learner.env_steps)
        if eval_due(learner.env_steps) or last:
            periodic_evaluation(learner, run, "student")
        if checkpoint_due(learner.env_steps) or last:
            run.save_state(learner)
            if not last:
                learner.begin_episodes()
    bar.close()
    learner.close()
