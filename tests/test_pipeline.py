"""`multitask pipeline` end to end on a micro config: every stage runs, the report's numbers are the
evaluation files', a second run reuses every stage, a run killed in the student stage resumes there,
a failing stage is named with its log, and an interrupted pipeline stops its stage before it exits."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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


def test_datasets_recorded_otherwise_are_refused_not_reused(project, run_cli):
    """The datasets stage reused any complete file of the right size and teacher, whatever control
    policy and epsilon `dataset_overrides` asked for (and would have resumed an unfinished one into a
    mix of both)."""
    from multitask import config as configlib
    from multitask.errors import UserError
    from multitask.pipeline import PipelineConfig, stages

    (project / "student.toml").write_text(STUDENT.format(updates=40))
    for g in GAMES:
        code, _, err = run_cli("dataset", "build", g, "--steps", "1000", "--num-envs", "8", "--lanes", "1",
                               "--no-progress")
        assert code == 0, err

    def datasets_stage(*overrides):
        return stages(configlib.load(PipelineConfig, project / "pipeline.toml", list(overrides)))[0][0]

    assert "every dataset holds 1,000 steps" in datasets_stage().reused()
    assert datasets_stage("dataset_steps=2000").reused() is None  # resumed to the bigger size
    for asked in (["epsilon=0.5"], ["--epsilon", "0.5"], ["control=mixture:teachers/minatar/Freeway.pt:0.5"]):
        stage = datasets_stage(f"dataset_overrides={','.join(asked)}")
        with pytest.raises(UserError, match="holds play recorded with control teacher, epsilon 0.05, not the pipeline's"):
            stage.reused()
    with pytest.raises(UserError, match="not a `dataset build` setting"):
        datasets_stage("dataset_overrides=--no-such-flag")


FAKE_STAGE = """import os, signal, sys, time
from pathlib import Path

out = Path(sys.argv[1])
(out / "stage.pid").write_text(str(os.getpid()))
if sys.argv[2] == "stubborn":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:  # SIGTERM stops it as Ctrl-C does, as it does a multi-game dataset build
    def stop(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop)
print("stage up", flush=True)
try:
    time.sleep(120)
except KeyboardInterrupt:
    time.sleep(2)  # stopping takes a while: a trainer saving its state, a build ending its flush
    (out / "stopped").write_text("clean")
    print("stage stopped", flush=True)
    sys.exit(130)
"""
RUN_STAGE = """import sys
from pathlib import Path

import multitask.pipeline as p

p.STAGE_STOP_SECONDS = 4
out = Path(sys.argv[1])
try:
    p._run_stage([sys.executable, str(out / "stage.py"), str(out), sys.argv[2]], out / "stage.log", print)
except KeyboardInterrupt:
    sys.exit(130)
"""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
@pytest.mark.parametrize("stage, sig", [("clean", signal.SIGINT), ("clean", signal.SIGTERM),
                                        ("stubborn", signal.SIGINT)], ids=["sigint", "sigterm", "stubborn"])
def test_an_interrupted_pipeline_stops_its_stage_before_it_exits(tmp_path, stage, sig):
    """The stage gets the interrupt, the pipeline waits while it stops (it used to exit 0.25 s after a
    Ctrl-C, and at once on SIGTERM, its stage running on), and kills a stage that does not stop."""
    (tmp_path / "stage.py").write_text(FAKE_STAGE)
    proc = subprocess.Popen([sys.executable, "-c", RUN_STAGE, str(tmp_path), stage], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log = tmp_path / "stage.log"
        deadline = time.monotonic() + 120
        while "stage up" not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.05)
        stage_pid = int((tmp_path / "stage.pid").read_text())
        os.kill(proc.pid, sig)  # the pipeline only: `kill -INT <pid>`, `kill <pid>`
        out, _ = proc.communicate(timeout=20)
        assert not _alive(stage_pid), "the stage outlived the pipeline"
        assert proc.returncode == 128 + sig, out
        if stage == "clean":
            assert (tmp_path / "stopped").exists() and "stage stopped" in log.read_text()
            assert "killed" not in out
        else:
            assert "stage stage: killed, it had not stopped 4 s after the interrupt" in out
    finally:
        proc.kill()
        pid_file = tmp_path / "stage.pid"
        if pid_file.exists() and _alive(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        proc.communicate()


def test_a_stage_printing_undecodable_bytes_is_relayed_to_its_end(tmp_path):
    """Bytes that are not UTF-8 are replaced: the relay keeps reading, so the stage never blocks on
    a full pipe (it did: the relay stopped at the first such byte and the pipeline waited for ever)."""
    from multitask.pipeline import _run_stage

    script = "import sys; sys.stdout.buffer.write(b'\\xff\\xfe\\n'); [print(i) for i in range(20000)]"
    lines = []
    code = _run_stage([sys.executable, "-c", script], tmp_path / "stage.log", lines.append, "bytes")
    log = (tmp_path / "stage.log").read_text()
    assert code == 0 and "\ufffd" in log and log.rstrip().endswith("19999") and len(lines) == 20001
