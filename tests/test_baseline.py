"""The multi-task DQN baseline on real MinAtar games: gradients per head, a micro run end to end,
exact resume after a kill, configs that follow the teacher preset, bad input."""

import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from multitask import config as configlib
from multitask.agents.checkpoints import load_agent
from multitask.agents.dqn import DQNConfig, DQNLearner
from multitask.agents.networks import MultiHeadNet
from multitask.agents.replay import join_batches, rows_per_game
from multitask.agents.sizes import sized_network
from multitask.envs import get_game
from multitask.training.acting import Acting
from multitask.training.baseline import BaselineConfig, load_config, train_baseline
from multitask.training.teacher import load_config as load_teacher_config

GAMES = ("minatar/Breakout", "minatar/Freeway")  # 4 and 7 channels: the trunk pads to 7
TINY = ["size=custom", "width=0.25", "num_threads=1", "eval_workers=1", "replay_capacity=4000",
        "learning_starts=500", "eval_episodes=2", "final_eval_episodes=2", "log_every=500", "dqn.batch_size=16"]
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "baseline"


def _filled_memories(steps: int = 40) -> tuple[MultiHeadNet, list[Acting]]:
    """A tiny two-game network and each game's replay after `steps` vector steps of random play."""
    games = [get_game(g) for g in GAMES]
    torch.manual_seed(0)
    net = MultiHeadNet(sized_network("custom", games, width=0.25)[0])
    acting = [Acting(g, 4, 400, seed=i, life_loss_terminal=True) for i, g in enumerate(games)]
    for i, a in enumerate(acting):
        a.begin(seed=10 * i)
        for _ in range(steps):
            a.act(net, i, epsilon=1.0)
    return net, acting


def test_each_head_learns_only_from_its_own_games_rows():
    net, acting = _filled_memories()
    cfg = DQNConfig(batch_size=12, max_grad_norm=0.0, reward_clip=False)
    # per-game update: Freeway's head gets no gradient from a Breakout batch
    per_game = DQNLearner(copy.deepcopy(net), cfg)
    per_game.update(acting[0].memory.sample(12), head=0)
    assert per_game.net.heads[1].weight.grad is None and per_game.net.heads[1].bias.grad is None
    assert per_game.net.heads[0].weight.grad.abs().sum() > 0
    # mixed update: each head's gradient is 1/G of the gradient of its own rows alone
    batches = [a.memory.sample(r) for a, r in zip(acting, rows_per_game(13, 2))]
    joined, groups = join_batches(batches, channels=7)
    assert joined.obs.shape == (13, 7, 10, 10) and [s.stop - s.start for _, s in groups] == [7, 6]
    mixed = DQNLearner(copy.deepcopy(net), cfg)
    out = mixed.update_grouped(joined, groups)
    assert out["loss"] == pytest.approx(sum(out["losses"]) / 2, rel=1e-6)
    for g, rows in groups:
        alone = DQNLearner(copy.deepcopy(net), cfg)
        own = joined._replace(**{k: getattr(joined, k)[rows] for k in joined._fields})
        alone.update_grouped(own, [(g, slice(None))])
        assert torch.allclose(2 * mixed.net.heads[g].weight.grad, alone.net.heads[g].weight.grad, atol=1e-6)
        assert torch.allclose(2 * mixed.net.heads[g].bias.grad, alone.net.heads[g].bias.grad, atol=1e-6)
        other = alone.net.heads[1 - g]
        assert other.weight.grad is None  # rows of one game reach no other head


def test_defaults_follow_the_teacher_preset_and_layer_under_the_users_keys(tmp_path):
    teacher = load_teacher_config("minatar", None, [])
    cfg = load_config(None, ["games=minatar/Breakout,minatar/Freeway", "dqn.batch_size=16"])
    assert cfg.total_steps_per_game == teacher.total_steps and cfg.num_envs == teacher.num_envs
    assert cfg.eps_decay_steps == teacher.eps_decay_steps and cfg.replay_capacity == teacher.replay_capacity
    assert cfg.dqn.lr == teacher.dqn.lr and cfg.dqn.reward_clip == teacher.dqn.reward_clip  # preset's [dqn]
    assert cfg.dqn.batch_size == 16  # the override wins over the preset
    own = tmp_path / "b.toml"
    own.write_text('games = ["minatar/Breakout"]\nnum_envs = 2\n[dqn]\nlr = 0.01\n')
    cfg = load_config(own, [])
    assert cfg.num_envs == 2 and cfg.dqn.lr == 0.01 and cfg.dqn.batch_size == teacher.dqn.batch_size
    preset = tmp_path / "t.toml"
    preset.write_text("total_steps = 1234\n[dqn]\nlr = 0.5\n")
    cfg = load_config(None, ["games=minatar/Breakout", f"teacher_preset={preset}"])
    assert cfg.total_steps_per_game == 1234 and cfg.dqn.lr == 0.5


def test_shipped_configs_load():
    five = load_config(CONFIGS / "minatar.toml", [])
    three = load_config(CONFIGS / "minatar3.toml", [])
    assert len(five.games) == 5 and len(three.games) == 3 and five.size == three.size == "multitask"
    assert five.total_steps_per_game == load_teacher_config("minatar", None, []).total_steps


@pytest.mark.parametrize("games, message", [
    ("minatar/Breakout,minatar/Pacman", "unknown game 'minatar/Pacman'"),
    ("minatar/Breakout,atari/Pong", "games from different suites (atari, minatar) cannot share a trunk"),
    ("minatar/Breakout,minatar/Breakout", "name each game once"),
])
def test_bad_games_end_in_one_sentence(run_cli, tmp_path, games, message):
    code, _, err = run_cli("baseline", "train", f"games={games}", "--run-dir", tmp_path / "r", "--wandb", "off")
    assert code == 2 and message in err and "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_one_sentence(run_cli, tmp_path):
    code, _, err = run_cli("baseline", "train", "games=minatar/Breakout", "device=cuda", "--run-dir", tmp_path)
    assert code == 2 and "no CUDA GPU" in err and err.count("\n") == 1


@pytest.fixture(scope="module")
def micro(tmp_path_factory, make_teacher):
    """Two games, mixed batches, evaluated at 1,000 and 2,000 env steps per game."""
    tmp = tmp_path_factory.mktemp("baseline")
    teachers = [str(make_teacher(tmp / f"{g.split('/')[1]}.pt", g, seed=i, eval_mean=2.0)) for i, g in enumerate(GAMES)]
    cfg = load_config(None, [f"games={','.join(GAMES)}", f"teachers={','.join(teachers)}", "batch_mode=mixed",
                             "total_steps_per_game=2000", "eval_every=1000", "checkpoint_every=1000", *TINY])
    summary = train_baseline(cfg, tmp / "run", wandb_mode="offline", show_progress=False)
    return tmp / "run", summary


@pytest.mark.slow
def test_micro_run_writes_config_metrics_checkpoints_and_summary(micro, run_cli):
    run, summary = micro
    saved = configlib.from_dict(BaselineConfig, configlib.read_toml(run / "config.toml"))
    assert saved.batch_mode == "mixed" and saved.device == "cpu" and saved.dqn.lr == 3e-4  # as built: preset's lr
    assert saved.total_steps_per_game == 2000 and saved.num_envs == 8
    logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for g in GAMES:
        for key in ("episode_return", "loss", "epsilon", "steps_per_s"):
            assert any(f"train/{g}/{key}" in x for x in logged), key
        assert [x["env_steps"] for x in logged if f"eval/{g}/score" in x] == [1000, 2000]
        assert any(f"eval/{g}/pct_teacher" in x for x in logged)
    assert any("eval/geomean_pct_teacher" in x for x in logged)
    losses = [x[f"train/{g}/loss"] for x in logged for g in GAMES if x["env_steps"] > 500 and f"train/{g}/loss" in x]
    assert losses and all(math.isfinite(v) for v in losses)  # every head learns once learning starts
    wandb_file = next((run / "wandb").glob("offline-run-*/run-*.wandb")).read_bytes()
    assert b"train/minatar/Freeway/episode_return" in wandb_file and b"eval/minatar/Breakout/score" in wandb_file
    assert (run / "state.pt").exists()
    for name in ("best.pt", "last.pt"):
        agent = load_agent(run / name)
        assert agent.kind == "multitask-dqn" and agent.net.games == GAMES and agent.net.spec.trunk.in_channels == 7
    code, out, err = run_cli("evaluate", run / "best.pt", "--episodes", 2, "--no-progress")
    assert code == 0, err
    assert "minatar/Breakout" in out and "minatar/Freeway" in out
    on_disk = json.loads((run / "summary.json").read_text())
    for key in ("run", "run_dir", "config", "parameters", "env_steps", "updates", "best_env_steps", "teacher_scores",
                "scores", "pct_teacher", "geomean_pct_teacher", "episodes", "history", "wall_time_s"):
        assert key in on_disk, key
    assert on_disk["env_steps"] == 2000 and len(on_disk["history"]) == 2 and set(on_disk["scores"]) == set(GAMES)
    assert on_disk["updates"] == summary["updates"] > 0
    table = (run / "table.md").read_text()
    assert "multi-task DQN" in table and all(g in table for g in GAMES)


def _cli(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "multitask", "baseline", "train", f"games={','.join(GAMES)}", *TINY,
            "total_steps_per_game=4000", "eval_every=2000", "checkpoint_every=1000", "device=cpu",
            "--run-dir", str(run_dir), "--wandb", "off", "--no-progress"]


@pytest.mark.slow
def test_killed_run_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path):
    # run where teachers/ holds none: no teacher to score, as this test needs none
    straight = subprocess.run(_cli(tmp_path / "straight"), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    deadline = time.time() + 300
    while not (killed / "state.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # no chance to clean up, as in a crash
    proc.wait()
    assert (killed / "state.pt").exists() and not (killed / "last.pt").exists()
    resumed = subprocess.run(_cli(killed), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {killed} after " in resumed.stderr
    a, b = load_agent(tmp_path / "straight" / "last.pt"), load_agent(killed / "last.pt")
    for (name, x), (_, y) in zip(a.net.state_dict().items(), b.net.state_dict().items()):
        assert torch.equal(x, y), name
    s, r = (json.loads((d / "summary.json").read_text()) for d in (tmp_path / "straight", killed))
    assert r["resumes"] == 1 and s["resumes"] == 0
    assert r["updates"] == s["updates"] and r["scores"] == s["scores"] and r["history"] == s["history"]


def test_every_game_acts_and_logs_with_the_linear_epsilon_schedule(tmp_path, monkeypatch):
    """A micro run (64 env steps per game, no learning): every game acts at env step t with
    eps_start -> eps_end linearly over eps_decay_steps, then eps_end; train/<game>/epsilon logs it."""
    acted = []
    act = Acting.act
    monkeypatch.setattr(Acting, "act", lambda self, net, head, epsilon: (acted.append((head, self.env_steps, epsilon)),
                                                                        act(self, net, head, epsilon))[1])
    monkeypatch.chdir(tmp_path)  # teachers/ holds none here: no teacher to score
    cfg = load_config(None, [f"games={','.join(GAMES)}", "size=custom", "width=0.25",
                             "num_threads=1", "eval_workers=1", "replay_capacity=1000", "learning_starts=100000",
                             "eval_episodes=1", "final_eval_episodes=1", "total_steps_per_game=64", "num_envs=4",
                             "eps_start=0.9", "eps_end=0.2", "eps_decay_steps=40", "log_every=4", "eval_every=1000",
                             "checkpoint_every=1000", "device=cpu"])
    train_baseline(cfg, tmp_path / "run", wandb_mode="off", show_progress=False)
    eps = {t: 0.9 - 0.7 * min(t / 40, 1.0) for t in range(0, 64, 4)}
    assert acted == [(head, t, pytest.approx(eps[t])) for t in eps for head in range(len(GAMES))]
    assert eps[60] == pytest.approx(0.2)  # the run reaches eps_end
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for g in GAMES:
        logged = [(x["env_steps"], x[f"train/{g}/epsilon"]) for x in lines if f"train/{g}/epsilon" in x]
        assert logged == [(t + 4, pytest.approx(e)) for t, e in eps.items()]  # logged after the step it acted in
