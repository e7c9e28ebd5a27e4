"""One job per game through submitit's local executor: a dataset build and an evaluation, and a
failing game's error named with its log. The commands run as processes, as users run them: in the
pytest process, after another test has started W&B's service, submitit's local jobs lost the
captured stderr (measured: the suite crashed with 'I/O operation on closed file')."""

import json
import subprocess
import sys

import pytest

from multitask.data.reader import DatasetReader
from multitask.data.verify import verify_invariants


def run_cli(*args, cwd=None):
    done = subprocess.run([sys.executable, "-m", "multitask", *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=cwd)
    return done.returncode, done.stdout, done.stderr


@pytest.mark.slow
def test_dataset_builds_as_submitit_local_jobs(tmp_path, make_teacher, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for game in ("Breakout", "Freeway"):
        make_teacher(tmp_path / "teachers" / "minatar" / f"{game}.pt", f"minatar/{game}", seed=1)
    code, out, err = run_cli("dataset", "build", "--games", "minatar/Breakout", "minatar/Freeway", "--steps", "300",
                             "--num-envs", "4", "--executor", "local", "--jobs-dir", tmp_path / "jobs", "--no-progress")
    assert code == 0, err
    assert "built 2 datasets, +600 steps" in out
    for game in ("Breakout", "Freeway"):
        with DatasetReader(tmp_path / "datasets" / "minatar" / f"{game}.h5") as r:
            assert len(r) == 300 and verify_invariants(r) == []
    assert list((tmp_path / "jobs").glob("*_log.out"))  # submitit's own job logs

    # a failing job (no teacher for Asterix) is named with its log; the other job still ran
    code, _, err = run_cli("dataset", "build", "--games", "minatar/Asterix", "minatar/Breakout", "--steps", "600",
                           "--resume", "--num-envs", "4", "--executor", "local", "--jobs-dir", tmp_path / "jobs2",
                           "--no-progress")
    assert code == 2 and "minatar/Asterix:" in err and "log:" in err and err.count("\n") == 1, err
    with DatasetReader(tmp_path / "datasets" / "minatar" / "Breakout.h5") as r:
        assert len(r) == 600


@pytest.mark.slow
def test_evaluation_as_submitit_local_jobs(tmp_path, make_teacher):
    student = make_teacher(tmp_path / "t.pt", "minatar/Breakout", seed=2)
    code, _, err = run_cli("evaluate", student, "--episodes", "3", "--executor", "local", "--jobs-dir",
                           tmp_path / "jobs", "--out", tmp_path / "scores.json")
    assert code == 0, err
    local = json.loads((tmp_path / "scores.json").read_text())["games"]["minatar/Breakout"]["returns"]
    code, _, err = run_cli("evaluate", student, "--episodes", "3", "--out", tmp_path / "here.json")
    assert code == 0, err
    assert json.loads((tmp_path / "here.json").read_text())["games"]["minatar/Breakout"]["returns"] == local


@pytest.mark.slow
def test_comparison_evaluations_as_submitit_local_jobs(tmp_path, make_teacher):
    """`compare --executor local`: every evaluation a submitit job, the report the same as here."""
    teacher = make_teacher(tmp_path / "T.pt", "minatar/Breakout", seed=1)
    student = make_teacher(tmp_path / "s.pt", "minatar/Breakout", seed=2)
    games = {}
    for how in ("processes", "local"):
        code, _, err = run_cli("compare", student, "--teachers", teacher, "--episodes", 3, "--out", tmp_path / how,
                               "--executor", how, "--jobs-dir", tmp_path / "jobs", "--bootstrap-reps", 100,
                               "--wandb", "off", "--no-progress")
        assert code == 0, err
        games[how] = [a["games"] for a in json.loads((tmp_path / how / "report.json").read_text())["agents"]]
    assert games["local"] == games["processes"]
    assert len(list((tmp_path / "jobs").glob("*_result.pkl"))) == 3  # random policy, teacher, student
