"""The one evaluation protocol, used for every agent (teachers, students, the multi-task DQN).

Per game: the agent acts epsilon-greedily (epsilon 0.05) on its head's outputs in the same env that
training and recording use, playing whole games (all lives) from the env's random starts (Atari:
up to 30 no-ops) until game over or the episode cap (Atari: 108,000 frames; MinAtar: 10,000 steps),
and the raw, unclipped game score is reported (Mnih et al. 2015; Machado et al. 2018; Rusu et al.
2016 without their non-public human starts).

Episodes run in parallel over a vector env. To avoid favouring short episodes, env i contributes
exactly its first `quota_i` episodes (the quotas sum to the requested number), never "the first N
episodes to finish".
"""

from __future__ import annotations

import copy
from pathlib import Path
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from multitask.agents.dqn import epsilon_greedy
from multitask.devices import exact_fp32
from multitask.envs import GameSpec, get_game, make_vector_env
from multitask.agents.networks import MultiHeadNet, NetworkSpec
from multitask.progress import Progress

EVAL_EPSILON = 0.05  # Mnih et al. 2015; Rusu et al. 2016
MAX_PARALLEL_ENVS = 32


def protocol(game: GameSpec, epsilon: float = EVAL_EPSILON) -> dict[str, Any]:
    """The protocol settings that every result file records beside its scores."""
    pre = game.preprocessing
    return {
        "epsilon": epsilon,
        "score": "raw game score of whole games (all lives), never clipped",
        "max_episode_steps": game.max_episode_steps,
        "max_episode_frames": pre.get("max_episode_frames"),
        "noop_max": pre.get("noop_max"),
        "sticky_action_prob": pre.get("sticky_action_prob", pre.get("repeat_action_probability")),
        "episode_assignment": "fixed per-env quotas (unbiased by episode length)",
        "env_id": game.env_id,
    }


@dataclass
class GameScores:
    game: str
    returns: list[float]
    lengths: list[int]
    truncated: list[bool]
    env_index: list[int]  # which parallel env played each episode (env i is seeded env_seed + i)
    env_seed: int
    action_seed: int
    protocol: dict[str, Any] = field(default_factory=dict)

    @property
    def mean(self) -> float:
        return float(np.mean(self.returns))

    def to_dict(self) -> dict[str, Any]:
        r = np.asarray(self.returns, dtype=np.float64)
        return {**asdict(self), "episodes": len(r), "mean": float(r.mean()),
                "std": float(r.std()), "min": float(r.min()), "max": float(r.max()),
                "stderr": float(r.std(ddof=1) / np.sqrt(len(r))) if len(r) > 1 else 0.0}


def quotas(episodes: int, num_envs: int) -> np.ndarray:
    """Episodes each env must contribute: as equal as possible, summing to `episodes`."""
    q = np.full(num_envs, episodes // num_envs)
    q[: episodes % num_envs] += 1
    return q


def evaluate_game(net: MultiHeadNet, game: GameSpec, episodes: int, seed: int,
                  epsilon: float = EVAL_EPSILON, num_envs: int | None = None,
                  show_progress: bool = False) -> GameScores:
    """Play `episodes` whole games of `game` with the net's head for it; raw scores."""
    head = net.head_index(game.name)
    device = next(net.parameters()).device
    n = num_envs or min(episodes, MAX_PARALLEL_ENVS)
    quota = quotas(episodes, n)
    env = make_vector_env(game, n)
    action_seed = seed + 1_000_003  # a distinct stream from the env seeds seed..seed+n-1
    rng = np.random.default_rng(action_seed)
    returns: list[list[float]] = [[] for _ in range(n)]
    lengths: list[list[int]] = [[] for _ in range(n)]
    truncs: list[list[bool]] = [[] for _ in range(n)]
    ep_return = np.zeros(n)
    ep_length = np.zeros(n, dtype=np.int64)
    bar = Progress(episodes, f"eval {game.name}", unit="episodes", enabled=show_progress)
    was_training = net.training
    net.eval()
    try:
        obs = env.reset(seed)
        while any(len(returns[i]) < quota[i] for i in range(n)):
            with torch.inference_mode():  # all envs in one forward pass, on the net's device
                q = net(torch.from_numpy(obs).to(device), head).cpu()
            step = env.step(epsilon_greedy(q, epsilon, rng))
            ep_return += step.reward
            ep_length += 1
            for i in np.flatnonzero(step.done):
                if len(returns[i]) < quota[i]:
                    returns[i].append(float(ep_return[i]))
                    lengths[i].append(int(ep_length[i]))
                    truncs[i].append(bool(step.truncated[i]))
                    bar.update(1, postfix=f"last {ep_return[i]:.1f}")
                ep_return[i], ep_length[i] = 0.0, 0
            obs = step.obs
    finally:
        env.close()
        net.train(was_training)
    bar.close()
    return GameScores(game=game.name, returns=[r for rs in returns for r in rs],
                      lengths=[x for xs in lengths for x in xs], truncated=[t for ts in truncs for t in ts],
                      env_index=[i for i in range(n) for _ in returns[i]],
                      env_seed=seed, action_seed=action_seed, protocol=protocol(game, epsilon))


def _evaluate_in_worker(spec_dict: dict, state_dict: dict, game_name: str, episodes: int, seed: int,
                        epsilon: float, device: str = "cpu") -> GameScores:
    torch.set_num_threads(1)
    exact_fp32()  # a spawned process starts with torch's defaults
    net = MultiHeadNet(NetworkSpec.from_dict(spec_dict))
    net.load_state_dict(state_dict)
    return evaluate_game(net.to(device), get_game(game_name), episodes, seed, epsilon)


def _evaluate_job(job: tuple) -> GameScores:
    return _evaluate_in_worker(*job)


def evaluate_games(net: MultiHeadNet, games: Sequence[str], episodes: int, seed: int,
                   epsilon: float = EVAL_EPSILON, workers: int = 1,
                   show_progress: bool = False, executor: str = "processes",
                   jobs_folder: Path = Path("runs/jobs/evaluations"),
                   device: torch.device | None = None) -> dict[str, GameScores]:
    """Evaluate several games on `device` (default: the net's), one process per game when
    workers > 1 (games run in parallel, each with the device), or one submitit job per game with
    executor local or slurm (multitask/jobs.py; the job's machine must have the device)."""
    device = torch.device(device) if device is not None else next(net.parameters()).device
    if executor == "processes" and (workers <= 1 or len(games) == 1):
        here = net if next(net.parameters()).device == device else copy.deepcopy(net).to(device)
        return {g: evaluate_game(here, get_game(g), episodes, seed, epsilon, show_progress=show_progress)
                for g in games}
    from multitask.jobs import run_jobs  # spawned processes (CUDA needs spawn) that an interrupt stops

    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    jobs = [(net.spec.to_dict(), state, g, episodes, seed, epsilon, str(device)) for g in games]
    return dict(zip(games, run_jobs(_evaluate_job, jobs, list(games), executor, workers, jobs_folder)))
