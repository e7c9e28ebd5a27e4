"""Teacher-training throughput against the machine's limit, measured in the same run.

For each suite it measures, alone and on the same threads:
  E  raw vector-env step rate (env steps/s, random actions, `num_envs` envs),
  A  batched action selection (env steps/s: one forward pass of `num_envs` observations),
  U  raw DQN train-step rate (updates/s: sample + Double-DQN update, replay already full),
and then the real trainer (`train_teacher`) at the preset's update ratio r. Env stepping, acting and
learning share the CPU, so the limit is  1 / (1/E + 1/A + r/U)  env steps/s; the benchmark prints
the trainer's steady-state rate and its ratio to that limit.

On a GPU (--device cuda) it also prints the train-bound limit U / r (env steps/s if only the
updates cost time) and the env-bound limit E.

With --layouts it also measures U in bf16 autocast, in channels-last layout and in both, against
fp32's U (the `precision` and `channels_last` keys), and U with torch's per-tensor Adam in place of
the fused one the learner uses: each variant and fp32 in 3 interleaved rounds, printed as the median
of the per-round ratios and their range.

    python bench/teacher_throughput.py [--suite minatar|atari|all] [--seconds 10] [--device auto|cpu|cuda] [--layouts]
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from multitask.agents.dqn import DQNLearner
from multitask.devices import arrange, pick_device
from multitask.envs import get_game, make_vector_env
from multitask.agents.networks import MultiHeadNet, teacher_network_spec
from multitask.agents.replay import ReplayMemory
from multitask.training.teacher import load_config, train_teacher

from interleave import ROUNDS, describe, interleaved_ratios

GAMES = {"minatar": "minatar/Breakout", "atari": "atari/Breakout"}
# --layouts: name, precision, channels_last, fused Adam
VARIANTS = (("bf16", "bf16", False, True), ("channels-last", "fp32", True, True), ("both", "bf16", True, True),
            ("per-tensor Adam", "fp32", False, False))
TORCH_DEFAULT_THREADS = torch.get_num_threads()  # before a suite's config sets them: --suite all must not carry them over


def timed(fn, seconds: float) -> tuple[int, float]:
    """Call fn() until `seconds` pass; returns (calls, elapsed)."""
    fn()  # warm up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return n, time.perf_counter() - t0


def bench_suite(suite: str, seconds: float, device_name: str = "cpu", layouts: bool = False) -> dict:
    device = pick_device(device_name)
    game = get_game(GAMES[suite])
    cfg = load_config(suite, None, [])
    torch.set_num_threads(cfg.num_threads or TORCH_DEFAULT_THREADS)
    n = cfg.num_envs
    rng = np.random.default_rng(0)

    env = make_vector_env(game, n)
    env.reset(0)
    calls, dt = timed(lambda: env.step(rng.integers(0, game.num_actions, n)), seconds)
    env_rate = calls * n / dt

    net = MultiHeadNet(teacher_network_spec(game, cfg.width)).to(device)
    obs = torch.from_numpy(env.step(np.zeros(n, dtype=np.int64)).obs)

    def act():  # as the trainer acts: observations to the device, actions back
        with torch.no_grad():
            net(obs.to(device), 0).argmax(1).cpu()
    calls, dt = timed(act, seconds)
    act_rate = calls * n / dt

    memory = ReplayMemory(min(cfg.replay_capacity, 20_000), n, game.frame_shape, game.stack)
    o = env.reset(1)
    memory.begin_episodes(o)
    for _ in range(min(cfg.replay_capacity, 20_000) // n):
        s = env.step(rng.integers(0, game.num_actions, n))
        memory.add(rng.integers(0, game.num_actions, n), s.reward, s.life_lost, s.next_obs, s.done, s.obs)
    env.close()
    learner = DQNLearner(net, cfg.dqn)

    def updates_per_s(lrn: DQNLearner, secs: float) -> float:
        calls, dt = timed(lambda: lrn.update(memory.sample(cfg.dqn.batch_size).to(device)), secs)
        return calls / dt
    update_rate = updates_per_s(learner, seconds)
    variants = {}  # name -> per-round ratios of U to fp32's U in the same round
    if layouts:  # bf16 autocast, channels-last (the config keys precision, channels_last), per-tensor Adam
        others = {"fp32": learner}
        for name, precision, nhwc, fused in VARIANTS:
            others[name] = DQNLearner(arrange(copy.deepcopy(net), nhwc), cfg.dqn, precision)
            if not fused:
                others[name].optimizer = torch.optim.Adam(others[name].net.parameters(), lr=cfg.dqn.lr,
                                                          eps=cfg.dqn.adam_eps, foreach=False)
        _, variants = interleaved_ratios({name: functools.partial(updates_per_s, other, max(1.0, seconds / ROUNDS))
                                          for name, other in others.items()}, "fp32")

    limit = 1.0 / (1.0 / env_rate + 1.0 / act_rate + cfg.update_ratio / update_rate)
    # The real trainer, past learning_starts, long enough for several log intervals.
    steps = int(max(limit * seconds * 3, 4 * n * 50))
    log_every = max(n, (steps // 4) // n * n)
    learning_starts = 1000
    with tempfile.TemporaryDirectory() as tmp:
        tcfg = load_config(suite, None, [f"total_steps={steps + learning_starts}", f"learning_starts={learning_starts}",
                                          f"log_every={log_every}", "eval_every=0", "final_eval_episodes=1",
                                          f"checkpoint_every={10**9}", "replay_capacity=20000",
                                          f"device={device.type}"])
        train_teacher(game.name, tcfg, Path(tmp) / "t.pt", Path(tmp) / "run", wandb_mode="off",
                      show_progress=False)
        logged = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    # only windows that start after learning_starts: earlier ones step without updating
    rates = [x[f"train/{game.name}/steps_per_s"] for x in logged
             if f"train/{game.name}/steps_per_s" in x and x["env_steps"] - log_every >= learning_starts]
    train_rate = float(np.median(rates))
    return {"suite": suite, "game": game.name, "device": str(device), "num_envs": n, "update_ratio": cfg.update_ratio,
            "batch_size": cfg.dqn.batch_size, "threads": torch.get_num_threads(),
            "env_steps_per_s": env_rate, "act_steps_per_s": act_rate, "updates_per_s": update_rate,
            "limit_steps_per_s": limit, "train_steps_per_s": train_rate, "ratio": train_rate / limit,
            "u_ratios_vs_fp32": variants}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", choices=("minatar", "atari", "all"), default="all")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    p.add_argument("--layouts", action="store_true", help="also U in bf16 autocast, in channels-last layout and with per-tensor Adam")
    args = p.parse_args()
    for suite in ("minatar", "atari") if args.suite == "all" else (args.suite,):
        r = bench_suite(suite, args.seconds, args.device, args.layouts)
        print(f"{r['game']} on {r['device']}: {r['num_envs']} envs, {r['threads']} torch thread(s), update ratio "
              f"{r['update_ratio']}, batch {r['batch_size']}")
        print(f"  raw vector env      E = {r['env_steps_per_s']:10,.0f} env steps/s")
        print(f"  batched acting      A = {r['act_steps_per_s']:10,.0f} env steps/s")
        print(f"  raw DQN train step  U = {r['updates_per_s']:10,.1f} updates/s")
        for name, ratios in r["u_ratios_vs_fp32"].items():
            print(f"    U {name:<17} -> {describe(ratios, 'fp32')}")
        print(f"  limit 1/(1/E+1/A+r/U) = {r['limit_steps_per_s']:10,.0f} env steps/s")
        print(f"  teacher training      = {r['train_steps_per_s']:10,.0f} env steps/s "
              f"-> ratio {r['ratio']:.2f} of the limit")
        train_bound = r["updates_per_s"] / r["update_ratio"]
        print(f"  train-bound U/r       = {train_bound:10,.0f} env steps/s -> ratio {r['train_steps_per_s'] / train_bound:.2f}; "
              f"env-bound E -> ratio {r['train_steps_per_s'] / r['env_steps_per_s']:.2f}")


if __name__ == "__main__":
    main()
