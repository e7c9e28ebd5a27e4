"""One job per game through submitit's local executor: a dataset build and an evaluation, and a
failing game's error named with its log; and in local processes, a multi-game build that an
interrupt stops whole. The commands run as processes, as users run them: in the
pytest process, after another test has started W&B's service, submitit's local jobs lost the
captured stderr (measured: the suite crashed with 'I/O operation on closed file')."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from multitask.data.reader import DatasetReader
from multitask.data.schema import parts_dir
from multitask.data.verify import verify_invariants
from multitask.errors import UserError
from multitask.jobs import STOP_SECONDS


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


def _live_processes_in_group(pgid: int) -> list[str]:
    """Processes of the process group that have not ended (zombies aside), as 'pid command'."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
            if int(pgrp) == pgid and state != "Z":
                alive.append(f"{stat.parent.name} {(stat.parent / 'cmdline').read_bytes()[:120]!r}")
        except (OSError, ValueError, IndexError):
            continue  # ended meanwhile
    return alive


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
@pytest.mark.parametrize("sig, to_group, when", [
    (signal.SIGINT, True, "starting"),   # Ctrl-C in a terminal (the whole group) while the workers import
    (signal.SIGINT, True, "recording"),  # Ctrl-C while both games record
    (signal.SIGINT, False, "recording"),  # kill -INT <pid>: the old pool waited for the jobs to end
    (signal.SIGTERM, False, "recording"),  # kill <pid>: the old pool's workers outlived it
], ids=["ctrl-c-starting", "ctrl-c", "sigint-parent", "sigterm-parent"])
def test_an_interrupted_multi_game_build_ends_every_process(tmp_path, make_teacher, sig, to_group, when):
    """A multi-game build (one spawned worker per game, each with its forked writer) stops within a
    few seconds of SIGINT or SIGTERM, leaves no process behind, and leaves files --resume continues."""
    games = ("Breakout", "Asterix")  # short episodes: flushes come fast
    for game in games:
        make_teacher(tmp_path / "teachers" / "minatar" / f"{game}.pt", f"minatar/{game}", seed=1)
    files = [tmp_path / "datasets" / "minatar" / f"{game}.h5" for game in games]
    log = tmp_path / "stderr.txt"  # not a pipe: workers that outlived the build would hold it open
    with log.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "multitask", "dataset", "build", "--games",
                                 *(f"minatar/{g}" for g in games), "--steps", "10000000", "--num-envs", "4",
                                 "--flush-steps", "300", "--no-progress"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                                stderr=stderr, start_new_session=True)  # its own group: as a terminal's job
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            started = (len(_live_processes_in_group(proc.pid)) >= 3 if when == "starting"  # workers spawned
                       else all(len(list(parts_dir(f).glob("part-*.h5"))) >= 2 for f in files))  # flushed
            if started:
                break
            time.sleep(0.05)
        assert proc.poll() is None, log.read_text()
        time.sleep(0.5)
        (os.killpg if to_group else os.kill)(proc.pid, sig)
        sent = time.monotonic()
        try:
            code = proc.wait(timeout=STOP_SECONDS + 10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the build had not exited {STOP_SECONDS + 10:g} s after {sig.name}")
        took = time.monotonic() - sent
        err = log.read_text()
        assert code == 128 + sig, err
        assert ("interrupted" if sig == signal.SIGINT else "terminated") in err
        assert took < STOP_SECONDS + 5, took
        deadline = time.monotonic() + 2  # the workers' helpers die with them (PR_SET_PDEATHSIG)
        while _live_processes_in_group(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _live_processes_in_group(proc.pid) == []
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left, so that no test leaves a build behind
        except ProcessLookupError:
            pass
        proc.wait()
    for path in files:  # each holds its flushed episodes; a build stopped before its first flush leaves nothing
        assert path.exists() or when == "starting"
        if path.exists():
            with DatasetReader(path) as d:
                assert d.info.status == "building" and verify_invariants(d) == []
                assert len(d) > 0 or when == "starting"


def _job_that_fails(kind: str):
    import os
    import signal

    if kind == "user":
        raise UserError("bad input")
    if kind == "bug":
        raise ValueError("a bug")
    if kind == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    return kind


@pytest.mark.slow
def test_failed_jobs_are_named_whatever_the_failure():
    from multitask.jobs import run_jobs

    with pytest.raises(UserError, match="user: bad input"):
        run_jobs(_job_that_fails, ["ok", "user"], ["ok", "user"], workers=2)
    with pytest.raises(ValueError, match="a bug") as bug:
        run_jobs(_job_that_fails, ["user", "bug"], ["user", "bug"], workers=2)
    notes = getattr(bug.value, "__notes__", ["in the job for bug", "other jobs failed too: user: bad input"])
    assert notes == ["in the job for bug", "other jobs failed too: user: bad input"]
    with pytest.raises(UserError, match="die: not finished, a job process died"):
        run_jobs(_job_that_fails, ["die", "ok"], ["die", "ok"], workers=2)
