"""`multitask pipeline` end to end on a micro config: every stage runs, the report's numbers are the
evaluation files', a second run reuses every stage, a run killed in the student stage resumes there,
and a failing stage is named with its log."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

GAMES = ("minatar/Breakout", "minatar/Freeway")
STUDENT = """games = ["minatar/Breakout"]
name = "micro-student"
size = "custom"
width = 0.25
batch_size = 32
updates = {updates}
eval_every = 20
eval_episodes = 2
final_eval_episodes = 2
checkpoint_every = 10
log_every = 10
loader_workers = 0
eval_workers = 1
num_threads = 1
"""
BASELINE = """games = ["minatar/Breakout"]
name = "micro-dqn"
size = "custom"
width = 0.25
total_steps_per_game = 400
learning_starts = 100
replay_capacity = 1000
eval_every = 200
eval_episodes = 2
final_eval_episodes = 2
eval_workers = 1
dqn.batch_size = 16
"""
PIPELINE = """name = "micro"
games = ["minatar/Breakout", "minatar/Freeway"]
dataset_steps = 1000
dataset_overrides = ["--num-envs", "8", "--lanes", "1"]
episodes = 3
wandb = "off"

[[students]]
config = "student.toml"

[baseline]
config = "baseline.toml"
"""


@pytest.fixture
def project(tmp_path, make_teacher, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for g in GAMES:
        make_teacher(tmp_path / "teachers" / "minatar" / f"{g.split('/')[1]}.pt", g, seed=1)
    (tmp_path / "baseline.toml").write_text(BASELINE)
    (tmp_path / "pipeline.toml").write_text(PIPELINE)
    return tmp_path


def _pipeline(*extra, **kw):
    return subprocess.run([sys.executable, "-m", "multitask", "pipeline", "pipeline.toml", *extra],
                          capture_output=True, text=True, timeout=900, **kw)


@pytest.mark.slow
def test_pipeline_runs_every_stage_then_reuses_them(project):
    (project / "student.toml").write_text(STUDENT.format(updates=40))
    first = _pipeline()
    assert first.returncode == 0, first.stderr + first.stdout
    assert "[1/4] datasets: running" in first.stdout and "[4/4] compare: running" in first.stdout
    assert "\n    student micro-student: " in first.stdout  # the stage's own lines, relayed as they come
    report = json.loads((project / "results" / "micro" / "report.json").read_text())
    assert [a["label"] for a in report["agents"]] == ["teacher", "micro-student", "micro-dqn"]
    for agent in report["agents"][1:]:
        for g, e in agent["games"].items():
            returns = json.loads((project / "results" / "micro" / e["evaluations"][0]).read_text())["scores"]["returns"]
            assert len(returns) == 3 and e["mean"] == pytest.approx(np.mean(returns))
    second = _pipeline()
    assert second.returncode == 0, second.stderr
    assert second.stdout.count("reused") == 4 and "running" not in second.stdout


@pytest.mark.slow
def test_a_killed_student_stage_resumes_and_a_failing_stage_is_named(project):
    (project / "student.toml").write_text(STUDENT.format(updates=120))
    proc = subprocess.Popen([sys.executable, "-m", "multitask", "pipeline", "pipeline.toml"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    state = project / "runs" / "student" / "micro-student" / "state.pt"
    deadline = time.time() + 600
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the pipeline and its stage, as in a crash
    proc.wait()
    again = _pipeline()
    assert again.returncode == 0, again.stderr + again.stdout
    assert "[1/4] datasets: reused" in again.stdout
    assert "resuming" in (project / "runs" / "pipeline" / "micro" / "student-micro-student.log").read_text()

    (project / "baseline.toml").write_text(BASELINE.replace("replay_capacity = 1000", "replay_capacity = 8"))
    failed = _pipeline()
    assert failed.returncode == 2 and "stage baseline micro-dqn failed" in failed.stderr
    assert "runs/pipeline/micro/baseline-micro-dqn.log" in failed.stderr and failed.stderr.count("\n") == 1


def test_the_committed_pipeline_configs_plan_their_stages(monkeypatch):
    from pathlib import Path

    from multitask import config as configlib
    from multitask.errors import UserError
    from multitask.pipeline import PipelineConfig, stages

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)  # the committed teachers and configs
    plans = {}
    for name in ("quickstart", "minatar", "minatar3"):
        plan, runs = stages(configlib.load(PipelineConfig, root / "configs" / "pipeline" / f"{name}.toml"))
        plans[name] = [s.name for s in plan]
        assert plans[name][0] == "datasets" and plans[name][-1] == "compare" and len(runs) == len(plan) - 2
    assert plans["quickstart"][1:3] == ["student minatar-multitask", "baseline quickstart-multitask-dqn-25k"]
    assert "student minatar-3games-nll-multitask-s2" in plans["minatar3"]
    with pytest.raises(UserError, match="stage teachers: no teacher for atari/Asteroids"):
        stages(configlib.load(PipelineConfig, root / "configs" / "pipeline" / "atari10.toml"))
