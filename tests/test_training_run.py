"""The run scaffolding every trainer shares: resume and its one mismatch check, metrics, clock,
schedules; and the scores trainers log."""

import json
from dataclasses import dataclass

import pytest
import torch

from multitask import config as configlib
from multitask.config import option
from multitask.errors import UserError
from multitask.training.run import Clock, Every, Run, config_differences, finite_or_null
from multitask.training.scoring import Scores


@dataclass(frozen=True)
class Inner:
    lr: float = option(1e-3, "test")


@dataclass(frozen=True)
class Tiny:
    steps: int = option(100, "test")
    threads: int = option(0, "test")
    inner: Inner = option(Inner(), "test")


def test_config_differences_names_nested_keys_in_config_order_and_skips_allowed_ones():
    saved = {"steps": 100, "threads": 1, "inner": {"lr": 1e-3}, "old": 5}
    current = {"steps": 200, "threads": 2, "inner": {"lr": 3e-4}}
    assert config_differences(saved, current) == [("steps", 100, 200), ("threads", 1, 2),
                                                  ("inner.lr", 1e-3, 3e-4), ("old", 5, None)]
    assert config_differences(saved, current, may_differ=("steps", "threads", "old")) == [("inner.lr", 1e-3, 3e-4)]
    assert config_differences(current, current) == []


def test_every_fires_once_per_multiple_and_continues_a_resumed_schedule():
    due = Every(30)
    assert [k for k in range(1, 100) if due(k)] == [30, 60, 90]
    resumed = Every(30, start=40)  # a run resumed at step 40 next fires at 60, as a straight run would
    assert [k for k in range(41, 100) if resumed(k)] == [60, 90]
    jumping = Every(10)  # steps of 8 envs: fires at the first step past each multiple, once
    assert [k for k in range(8, 100, 8) if jumping(k)] == [16, 24, 32, 40, 56, 64, 72, 80, 96]
    never = Every(0)
    assert not any(never(k) for k in range(100))


def test_clock_counts_the_time_of_the_runs_it_resumed():
    clock = Clock(wall_before=100.0, cpu_before=7.0)
    assert 100.0 <= clock.wall() < 101.0 and 7.0 <= clock.cpu() < 8.0
    assert set(clock.state()) == {"wall_time_s", "cpu_time_s"}


class Learning:
    """The smallest Resumable: a step count and one tensor."""

    def __init__(self, step=0):
        self.step, self.weights = step, torch.full((2,), float(step))

    def state_dict(self):
        return {"step": self.step, "weights": self.weights}

    def load_state_dict(self, saved):
        self.step, self.weights = saved["step"], saved["weights"]


def _run(folder, cfg=Tiny(), writer=True):
    return Run(folder, cfg, step_metric="updates", identity={"game": "minatar/Breakout"}, writer=writer)


def test_run_writes_config_metrics_and_state_and_resumes_them(tmp_path, capsys):
    run = _run(tmp_path)
    assert not run.resume(Learning(), restart=False)
    run.start("off", name="t", job_type="test", group="tests")
    run.log({"train/loss": 0.5}, 10)
    run.save_state(Learning(10))
    run.finish({})
    assert configlib.load(Tiny, tmp_path / "config.toml") == Tiny()
    wall = torch.load(tmp_path / "state.pt", weights_only=True)["wall_time_s"]

    again, learning = _run(tmp_path, Tiny(steps=200, threads=4)), Learning()
    assert again.resume(learning, restart=False, may_differ=("steps", "threads"))
    assert learning.step == 10 and torch.equal(learning.weights, torch.full((2,), 10.0)) and again.resumes == 1
    assert f"resuming {tmp_path} after 10 updates" in capsys.readouterr().err
    again.start("off", name="t", job_type="test", group="tests")
    assert again.clock.wall() >= wall
    again.log({"train/loss": 0.25}, 20)
    again.finish({})
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"updates": 10, "train/loss": 0.5}, {"updates": 20, "train/loss": 0.25}]
    assert configlib.load(Tiny, tmp_path / "config.toml").steps == 200  # the config this run was built with


def test_a_resumed_run_logs_no_step_twice_and_writes_json_numbers(tmp_path):
    """Lines the killed run logged after its last checkpoint, and a finished run's final lines, go
    when it resumes (it logs them again); NaN and infinities are written as null."""
    run = _run(tmp_path)
    run.resume(Learning(), restart=False)
    run.start("off", name="t", job_type="test", group="tests")
    run.log({"train/loss": 0.5}, 10)
    run.save_state(Learning(10))
    run.log({"train/loss": 0.75, "train/x": float("inf"), "train/y": float("nan")}, 15)  # then killed: no checkpoint at 15
    run.log({"final/score": 1.0}, 10)
    run.log({"eval/minatar/Breakout/final_score": 1.0}, 10)  # a teacher's final line
    run.finish({})
    again = _run(tmp_path)
    assert again.resume(Learning(), restart=False)
    again.start("off", name="t", job_type="test", group="tests")
    again.log({"train/loss": 0.25}, 15)
    again.finish({})
    text = (tmp_path / "metrics.jsonl").read_text()
    assert [json.loads(x) for x in text.splitlines()] == [{"updates": 10, "train/loss": 0.5},
                                                          {"updates": 15, "train/loss": 0.25}]
    assert "NaN" not in text and "Infinity" not in text
    assert finite_or_null({"a": float("nan"), "b": float("-inf"), "c": 1.5}) == {"a": None, "b": None, "c": 1.5}


def _finished_run(folder, step: int) -> None:
    """A run of `Tiny` in `folder` that checkpointed at `step` and finished."""
    run = _run(folder)
    run.resume(Learning(), restart=False)
    run.start("off", name="t", job_type="test", group="tests")
    run.save_state(Learning(step))
    run.finish({})


def test_resume_refuses_other_settings_in_one_sentence_unless_restarted(tmp_path):
    _finished_run(tmp_path, 5)
    with pytest.raises(UserError, match=r"holds a run with other settings \(inner\.lr 0\.001 then, 0\.01 now\); "
                                        r"rerun with its settings .* pass --restart"):
        _run(tmp_path, Tiny(inner=Inner(lr=1e-2))).resume(Learning(), restart=False)
    other_game = Run(tmp_path, Tiny(), step_metric="updates", identity={"game": "minatar/Asterix"})
    with pytest.raises(UserError, match="game 'minatar/Breakout' then, 'minatar/Asterix' now"):
        other_game.resume(Learning(), restart=False)
    assert not other_game.resume(Learning(), restart=True) and not (tmp_path / "state.pt").exists()
    (tmp_path / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read training checkpoint"):
        _run(tmp_path).resume(Learning(), restart=False)


def test_a_restart_leaves_nothing_of_the_old_run_and_a_fresh_start_begins_a_new_curve(tmp_path):
    run = _run(tmp_path)
    run.resume(Learning(), restart=False)
    run.start("off", name="t", job_type="test", group="tests")
    run.log({"train/loss": 0.5}, 10)
    run.save_state(Learning(10))
    for name in ("best.pt", "best.json"):  # as save_agent writes them
        (tmp_path / name).write_bytes(b"an old agent")
    run.write_text("summary.json", "{}")
    run.finish({})
    assert {"state.pt", "best.pt", "best.json", "summary.json"} <= {p.name for p in tmp_path.iterdir()}
    again = _run(tmp_path, Tiny(inner=Inner(lr=1e-2)))
    assert not again.resume(Learning(), restart=True)
    assert not any((tmp_path / name).exists() for name in ("state.pt", "best.pt", "best.json", "summary.json",
                                                           "metrics.jsonl"))
    again.start("off", name="t", job_type="test", group="tests")
    again.log({"train/loss": 0.25}, 5)
    again.finish({})
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == ['{"updates": 5, "train/loss": 0.25}']
    assert not (tmp_path / "state.pt").exists()  # as if killed before its first checkpoint: the next start is fresh
    fresh = _run(tmp_path, Tiny(inner=Inner(lr=1e-2)))
    assert not fresh.resume(Learning(), restart=False)
    fresh.start("off", name="t", job_type="test", group="tests")
    fresh.finish({})
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_only_the_writer_writes(tmp_path):
    run = _run(tmp_path / "rank1", writer=False)
    run.resume(Learning(), restart=False)
    run.start("offline", name="t", job_type="test", group="tests")  # no W&B run either
    run.log({"x": 1.0}, 1)
    run.save_state(Learning(1))
    assert run.save_agent("best", torch.nn.Linear(1, 1), "student", {}) is None
    run.finish({})
    assert not (tmp_path / "rank1").exists()


def test_scores_metrics_line_and_selection():
    games = {"minatar/Breakout": {"mean": 4.0}, "minatar/Freeway": {"mean": 30.0}}
    full = Scores(games, {"minatar/Breakout": 40.0, "minatar/Freeway": 90.0}, 60.0)
    assert full.metrics() == {"eval/minatar/Breakout/score": 4.0, "eval/minatar/Freeway/score": 30.0,
                              "eval/minatar/Breakout/pct_teacher": 40.0, "eval/minatar/Freeway/pct_teacher": 90.0,
                              "eval/geomean_pct_teacher": 60.0, "eval/mean_pct_teacher": 65.0}
    assert full.line() == "Breakout 4.00 (40%), Freeway 30.00 (90%); geometric mean 60% of teachers"
    assert full.selection_score == 60.0
    partial = Scores(games, {"minatar/Freeway": 90.0}, None)  # Breakout's teacher has no score
    assert "eval/geomean_pct_teacher" not in partial.metrics()
    assert partial.line() == "Breakout 4.00, Freeway 30.00 (90%)" and partial.selection_score == 17.0



def test_a_key_added_to_the_config_later_resumes_only_at_its_default(tmp_path):
    run = _run(tmp_path)
    run.resume(Learning(), restart=False)
    run.start("off", name="t", job_type="test", group="tests")
    run.save_state(Learning(5))
    run.finish({})
    saved = torch.load(tmp_path / "state.pt", weights_only=True)
    del saved["config"]["threads"]  # a run saved before `threads` existed
    torch.save(saved, tmp_path / "state.pt")
    assert _run(tmp_path).resume(Learning(), restart=False)  # threads holds its default: the same run
    with pytest.raises(UserError, match="threads None then, 4 now"):
        _run(tmp_path, Tiny(threads=4)).resume(Learning(), restart=False)


@dataclass(frozen=True)
class Spec:
    kind: str
    shape: str = "uniform"


def test_fields_added_later_to_nested_tables_and_identity_specs_resume_only_at_their_defaults(tmp_path):
    """A run saved before Inner.lr and Spec.shape existed (the first multi-task DQN runs predate
    TrunkSpec.shape) resumes when they hold their defaults, and is refused when they do not."""
    def run(cfg=Tiny(), spec=Spec("minatar")):
        return Run(tmp_path, cfg, step_metric="updates", identity={"network": spec})

    first = run()
    first.resume(Learning(), restart=False)
    first.start("off", name="t", job_type="test", group="tests")
    first.save_state(Learning(5))
    first.finish({})
    saved = torch.load(tmp_path / "state.pt", weights_only=True)
    assert saved["network"] == {"kind": "minatar", "shape": "uniform"}  # saved as a dict, loadable weights-only
    del saved["config"]["inner"]["lr"], saved["network"]["shape"]
    torch.save(saved, tmp_path / "state.pt")
    assert run().resume(Learning(), restart=False)
    with pytest.raises(UserError, match="network.shape None then, 'strided' now"):
        run(spec=Spec("minatar", "strided")).resume(Learning(), restart=False)
    with pytest.raises(UserError, match="inner.lr None then, 0.01 now"):
        run(cfg=Tiny(inner=Inner(lr=1e-2))).resume(Learning(), restart=False)
    with pytest.raises(UserError, match="network.kind 'minatar' then, 'nature' now"):
        run(spec=Spec("nature")).resume(Learning(), restart=False)


@dataclass(frozen=True)
class Shaped:
    shape: str = option("preset", "test", absent="uniform")  # a default that changed meaning


def test_a_key_whose_default_changed_meaning_counts_absent_as_the_value_old_runs_were_built_with():
    from multitask.training.run import added_at_defaults

    assert added_at_defaults(Shaped(shape="uniform"), {}) == ["shape"]  # saved without it: built uniform
    assert added_at_defaults(Shaped(), {}) == [] and added_at_defaults(Shaped(shape="strided"), {}) == []
    assert added_at_defaults(Tiny(), {}) == ["steps", "threads"]  # no `absent`: the default, as before
    assert configlib.saved_config(Shaped, {}) == {"shape": "uniform"}
    assert configlib.saved_config(Shaped, {"shape": "strided"}) == {"shape": "strided"}
    assert configlib.saved_config(Tiny, {}) == {}


def test_a_run_folder_that_cannot_be_written_is_refused_before_any_work(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=r"cannot write .*file/config.toml .*choose a writable --run-dir"):
        _run(tmp_path / "file").resume(Learning(), restart=False)
    (tmp_path / "run" / "config.toml").mkdir(parents=True)
    with pytest.raises(UserError, match=r"cannot write .*config.toml: it is a folder"):
        _run(tmp_path / "run").resume(Learning(), restart=False)


def test_a_run_past_a_lowered_budget_is_refused_on_resume(tmp_path):
    _finished_run(tmp_path, 10)
    for value, stride in ((10, 1), (8, 4), (200, 1)):  # its own budget, one stride past a budget, more
        assert _run(tmp_path).resume(Learning(), restart=False, budget=("steps", value, stride))
    with pytest.raises(UserError, match=r"has trained 10 updates, past steps=6; pass steps=10 or more"):
        _run(tmp_path).resume(Learning(), restart=False, budget=("steps", 6, 4))


def test_a_diverged_run_ends_in_one_sentence_before_writing_a_checkpoint(tmp_path, make_teacher):
    """A NaN loss, or weights no trained network holds, used to train on to the end and leave a best.pt
    that loading refused as corrupt; both end the run where they are met."""
    from multitask.agents.checkpoints import load_agent

    run = _run(tmp_path)
    run.resume(Learning(), restart=False)
    run.start("off", name="t", job_type="test", group="tests")
    run.log({"train/minatar/Breakout/loss": 0.5, "train/samples_per_s": float("nan")}, 10)  # not a loss: logged
    with pytest.raises(UserError, match="training diverged: train/minatar/Breakout/loss is nan at update 20"):
        run.log({"train/minatar/Breakout/loss": float("nan")}, 20)
    net = load_agent(make_teacher(tmp_path / "t.pt", "minatar/Breakout")).net
    assert run.save_agent("best", net, "student", {}) is not None
    with torch.no_grad():
        net.trunk.convs[0].weight[0, 0, 0, 0] = 3e7
    (tmp_path / "best.pt").unlink()
    with pytest.raises(UserError, match="training diverged: the network holds a weight of 3e\\+07"):
        run.save_agent("best", net, "student", {})
    assert not (tmp_path / "best.pt").exists()
    run.finish({})


def test_a_run_folder_is_one_processs_at_a_time(tmp_path):
    """Two processes on one run folder would interleave its state.pt, metrics and checkpoints."""
    import os

    from multitask.training import run as runlib

    def other_process_holds() -> int:
        """In a forked child (not holding the lock: POSIX locks are per process): 0 if it gets the
        folder, 1 if it is refused in one sentence."""
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child)
            runlib._HELD.clear()  # the parent's bookkeeping, copied by fork; the lock itself is not
            try:
                runlib.hold_folder(tmp_path)
                os._exit(0)
            except UserError as e:
                os._exit(1 if "is in use by another process" in str(e) else 3)
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    run = _run(tmp_path)
    run.resume(Learning(), restart=False)  # this process holds the folder now
    assert other_process_holds() == 1
    assert _run(tmp_path).resume(Learning(), restart=False) is False  # the same process may go on
    run.start("off", name="t", job_type="test", group="tests")
    run.finish({})  # released: another process may take it
    assert other_process_holds() == 0
