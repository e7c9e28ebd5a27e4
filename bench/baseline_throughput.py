"""Multi-task DQN throughput against its limit, and how it scales with torch threads.

For a baseline config (default: the five-game MinAtar one) and each thread count, in interleaved
rounds on the same process:
  A  acting: one epsilon-greedy vector step of every game (`MultitaskDQN.act`), seconds per round,
  U  one DQN update (sample + Double-DQN update of one game's batch), seconds,
and then the trainer's own loop (`act` then `learn`, past learning_starts) for --seconds. A round
steps every game's `num_envs` envs once and makes k = games x num_envs x update_ratio updates, so
the limit is  num_envs / (A + k U)  env steps per game per second; the loop's rate is printed with
its ratio to that limit and, per thread count, its speed-up over the first thread count. Logging,
evaluation and checkpoints are left out (they cost ~1% at the preset's intervals).

    python bench/baseline_throughput.py [--config configs/baseline/minatar.toml] [--threads 1 2] [--rounds 3] [--seconds 10]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from multitask.agents.sizes import sized_network
from multitask.training.baseline import MultitaskDQN, load_config, resolve_games
from teacher_throughput import timed  # bench/ is on sys.path when a bench runs as a script

FILL_STEPS = 2_000  # env steps per game stored before timing (learning_starts is set to this)


def per_call(fn, seconds: float) -> float:
    """Seconds per call of fn(), called until `seconds` pass (teacher_throughput's timing)."""
    calls, elapsed = timed(fn, seconds)
    return elapsed / calls


def build(config: Path) -> MultitaskDQN:
    cfg = load_config(config, [f"learning_starts={FILL_STEPS}"])
    games, _ = resolve_games(cfg)
    spec, size = sized_network(cfg.size, games, cfg.width, cfg.extra_fc)
    dqn = MultitaskDQN(spec, cfg, games, torch.device("cpu"), size.counts("network"), {})
    dqn.begin_episodes()
    while dqn.env_steps < FILL_STEPS:
        dqn.act(1.0)
    return dqn


def one_round(dqn: MultitaskDQN, threads: int, seconds: float) -> dict:
    torch.set_num_threads(threads)
    n = len(dqn.games)
    act = per_call(lambda: dqn.act(0.05), seconds / 4)

    def update():
        g = dqn.learner.updates % n
        dqn.learner.update(dqn.acting[g].memory.sample(dqn.cfg.dqn.batch_size), head=g)
    upd = per_call(update, seconds / 4)

    def loop():
        dqn.act(0.05)
        dqn.learn()
    per_round = per_call(loop, seconds)
    k = n * dqn.cfg.num_envs * dqn.cfg.update_ratio
    return {"act_s": act, "update_s": upd, "limit": dqn.cfg.num_envs / (act + k * upd),
            "loop": dqn.cfg.num_envs / per_round}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=Path("configs/baseline/minatar.toml"))
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=10.0, help="seconds of the trainer's loop per round")
    args = p.parse_args()
    dqn = build(args.config)
    cfg = dqn.cfg
    print(f"{len(dqn.games)} games, {dqn.counts['network']:,} parameters, {cfg.num_envs} envs per game, "
          f"update ratio {cfg.update_ratio}, batch {cfg.dqn.batch_size}, {cfg.batch_mode} batches")
    rounds: dict[int, list[dict]] = {t: [] for t in args.threads}
    for r in range(args.rounds):
        for t in args.threads:  # interleaved, so that drift hits every thread count alike
            rounds[t].append(one_round(dqn, t, args.seconds))
            x = rounds[t][-1]
            print(f"  round {r + 1}, {t} thread(s): act {x['act_s'] * 1e3:.2f} ms/round, update {x['update_s'] * 1e3:.2f} ms, "
                  f"loop {x['loop']:.0f} env steps/game/s", flush=True)
    dqn.close()
    base = None
    print("medians over rounds:")
    for t in args.threads:
        med = {k: statistics.median(x[k] for x in rounds[t]) for k in rounds[t][0]}
        base = base or med["loop"]
        print(f"  {t} thread(s): limit num_envs/(A+kU) = {med['limit']:6.1f}, trainer loop = {med['loop']:6.1f} env steps "
              f"per game per s -> ratio {med['loop'] / med['limit']:.2f} of the limit, {med['loop'] / base:.2f}x the "
              f"{args.threads[0]}-thread loop")


if __name__ == "__main__":
    main()
