"""Teacher training end to end on a real MinAtar game: learns, writes a teacher, resumes."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from multitask import config as configlib
from multitask.agents.checkpoints import load_teacher
from multitask.files import file_sha256
from multitask.envs import get_game
from multitask.evaluation.protocol import evaluate_game
from multitask.training.acting import Acting
from multitask.training.teacher import TeacherConfig, load_config, train_teacher

slow = pytest.mark.slow  # these tests train a teacher (30-60 s on 2 cores)

# A short, fast-learning setting (measured: ~8 points on Breakout after 40k steps, random ~0.5).
FAST = ["total_steps=30000", "learning_starts=2000", "eps_decay_steps=15000", "replay_capacity=20000",
        "eval_every=10000", "eval_episodes=5", "final_eval_episodes=20", "checkpoint_every=10000",
        "dqn.lr=1e-3", "dqn.batch_size=32", "dqn.target_update_every=250", "num_threads=1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("teacher")
    cfg = load_config("minatar", None, FAST + ["seed=3"])
    out = tmp / "teachers" / "Breakout.pt"
    card = train_teacher("minatar/Breakout", cfg, out, tmp / "run", wandb_mode="offline", show_progress=False)
    return tmp, out, card


@slow
def test_short_training_beats_the_random_policy(trained):
    _, out, card = trained
    game = get_game("minatar/Breakout")
    agent, _ = load_teacher(out, "minatar/Breakout")
    random_policy = evaluate_game(agent.net, game, episodes=20, seed=7, epsilon=1.0)
    learned = evaluate_game(agent.net, game, episodes=20, seed=7)
    assert learned.mean > random_policy.mean + 1.0, (learned.mean, random_policy.mean)
    assert card["eval"]["mean"] > random_policy.mean + 1.0


@slow
def test_teacher_card_has_full_provenance(trained):
    _, out, card = trained
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["sha256"] == file_sha256(out)
    assert saved["env_steps"] == 30000 and saved["updates"] > 0 and saved["wall_time_s"] > 0
    assert saved["game"]["action_meanings"] == ["NOOP", "LEFT", "RIGHT"]
    assert saved["game"]["preprocessing"]["sticky_action_prob"] == 0.1
    assert saved["eval"]["episodes"] == 20 and saved["eval"]["protocol"]["epsilon"] == 0.05
    cfg = configlib.from_dict(TeacherConfig, saved["config"])
    assert cfg.dqn.lr == 1e-3 and cfg.seed == 3
    assert len(saved["learning_curve"]) >= 3


@slow
def test_training_writes_a_real_wandb_offline_run(trained):
    tmp, _, _ = trained
    runs = list((tmp / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    data = next(runs[0].glob("run-*.wandb")).read_bytes()
    assert b"eval/minatar/Breakout/score" in data and b"train/minatar/Breakout/loss" in data
    lines = [json.loads(x) for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/minatar/Breakout/score" in x for x in lines)


@slow
def test_evaluate_cli_writes_episodes_protocol_and_seeds(trained, run_cli, tmp_path):
    _, out, _ = trained
    code, stdout, _ = run_cli("evaluate", out, "--episodes", 6, "--out", tmp_path / "s.json", "--no-progress")
    assert code == 0, stdout
    report = json.loads((tmp_path / "s.json").read_text())
    g = report["games"]["minatar/Breakout"]
    assert len(g["returns"]) == len(g["lengths"]) == 6
    assert g["protocol"]["epsilon"] == 0.05 and g["env_seed"] == 12345
    assert report["agent"]["sha256"] == file_sha256(out)
    row = f"| minatar/Breakout | {g['mean']:.2f} | {g['stderr']:.2f} | {g['std']:.2f} |"  # mean, its error, the spread
    assert row in stdout
    code, shown, err = run_cli("report", "show", tmp_path / "s.json")  # the data flow's scores.json, as a table
    assert code == 0 and row in shown and str(out) in shown, err


@slow
def test_evaluate_cli_refuses_a_game_the_checkpoint_does_not_play(trained, run_cli):
    _, out, _ = trained
    code, _, err = run_cli("evaluate", out, "--games", "minatar/Asterix")
    assert code == 2 and "no head for minatar/Asterix" in err and "Traceback" not in err


@slow
def test_killed_run_resumes_instead_of_restarting(tmp_path):
    args = [sys.executable, "-m", "multitask", "teacher", "train", "minatar/Breakout",
            "total_steps=16000", "learning_starts=1000", "checkpoint_every=4000", "eval_every=0",
            "replay_capacity=8000", "final_eval_episodes=2", "num_threads=1",
            "--out", str(tmp_path / "B.pt"), "--run-dir", str(tmp_path / "run"), "--wandb", "off",
            "--no-progress"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    state = tmp_path / "run" / "state.pt"
    deadline = time.time() + 300
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)  # no chance to clean up, as in a crash
    proc.wait()
    assert state.exists() and not (tmp_path / "B.pt").exists()
    steps_logged_before = [json.loads(x)["env_steps"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"resuming {tmp_path / 'run'} after " in done.stderr
    resumed_at = int(done.stderr.split(" after ")[1].split()[0].replace(",", ""))
    assert resumed_at >= 4000
    card = json.loads((tmp_path / "B.json").read_text())
    assert card["resumes"] == 1 and card["env_steps"] == 16000
    steps_logged = [json.loads(x)["env_steps"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    after = steps_logged[len(steps_logged_before):]
    assert after and min(after) > resumed_at  # logging continued from the checkpoint, not from 0


def _linear(start: float, end: float, duration: int, t: int) -> float:
    return start + (end - start) * min(t / duration, 1.0)


def test_acts_and_logs_with_the_linear_epsilon_schedule(tmp_path, monkeypatch):
    """A micro run (64 env steps, no learning): the epsilon the agent acts with at env step t is
    eps_start -> eps_end linearly over eps_decay_steps, then eps_end; train/<game>/epsilon logs it."""
    acted = []
    act = Acting.act
    monkeypatch.setattr(Acting, "act", lambda self, net, head, epsilon: (acted.append((self.env_steps, epsilon)),
                                                                        act(self, net, head, epsilon))[1])
    cfg = load_config("minatar", None, ["total_steps=64", "num_envs=4", "eps_start=0.9", "eps_end=0.2",
                                        "eps_decay_steps=40", "log_every=4", "learning_starts=100000",
                                        "replay_capacity=1000", "eval_every=0", "keep_best=false",
                                        "final_eval_episodes=1", "checkpoint_every=1000", "num_threads=1",
                                        "width=0.25", "device=cpu"])
    train_teacher("minatar/Breakout", cfg, tmp_path / "B.pt", tmp_path / "run", wandb_mode="off", show_progress=False)
    expected = [(t, pytest.approx(_linear(0.9, 0.2, 40, t))) for t in range(0, 64, 4)]
    assert acted == expected
    assert acted[-1][1] == pytest.approx(0.2) and acted[1][1] == pytest.approx(0.9 - 0.7 * 4 / 40)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [(x["env_steps"], x["train/minatar/Breakout/epsilon"]) for x in lines if "train/minatar/Breakout/epsilon" in x]
    assert logged == [(t + 4, eps) for t, eps in expected]  # logged after the step it acted in
