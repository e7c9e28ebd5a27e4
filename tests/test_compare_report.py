"""`multitask compare`'s report as a reader gets it: an input of kind teacher is an agent column, a
teacher no better than random is flagged, refusals leave no --out folder, the command is recorded,
the plots' intervals and colours, and a pipeline's comparison is redone when a teacher changes."""

import json
from pathlib import Path

import matplotlib.axes
import pytest
import torch

from multitask.agents.checkpoints import save_agent
from multitask.agents.networks import MultiHeadNet, NetworkSpec, TrunkSpec
from multitask.envs import get_game
from multitask.evaluation import plots
from multitask.evaluation.compare import compare, game_entry
from multitask.evaluation.entrants import choose_games, resolve_entrants
from multitask.evaluation.statistics import t_multiplier

REPO = Path(__file__).resolve().parents[1]
COMMITTED_BREAKOUT = REPO / "teachers" / "minatar" / "Breakout.pt"


def _student(path: Path, games=("minatar/Breakout",), seed: int = 0) -> Path:
    torch.manual_seed(seed)
    net = MultiHeadNet(NetworkSpec(TrunkSpec("minatar", 10, 10, width=0.25), tuple(games),
                                    tuple(get_game(g).num_actions for g in games)))
    save_agent(path, net, "student", {"source": "test"})
    return path


class _BarSpy:
    """Records every Axes.bar call's label and colour(s)."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = matplotlib.axes.Axes.bar

        def bar(ax, *args, **kwargs):
            self.calls.append(kwargs)
            return real(ax, *args, **kwargs)

        monkeypatch.setattr(matplotlib.axes.Axes, "bar", bar)


@pytest.mark.skipif(not COMMITTED_BREAKOUT.is_file(), reason="needs the committed MinAtar Breakout teacher")
def test_an_input_of_kind_teacher_gets_its_interval_and_its_bar(tmp_path, make_teacher, monkeypatch):
    other_teacher = make_teacher(tmp_path / "Breakout.pt", "minatar/Breakout", seed=7)  # e.g. a retrained teacher
    report = compare([other_teacher], tmp_path / "out", episodes=6, seed=4242, teachers=[COMMITTED_BREAKOUT],
                     workers=1, reps=200, wandb="off", show_progress=False)
    teacher, agent = report["agents"]
    assert teacher["label"] == "teacher" and agent["kind"] == "teacher"
    e = agent["games"]["minatar/Breakout"]
    assert teacher["games"]["minatar/Breakout"]["mean"] > report["random"]["minatar/Breakout"]["mean"]
    assert e["pct_teacher"] is not None and e["pct_teacher_ci95"] is not None  # was None: taken for the teacher
    assert teacher["games"]["minatar/Breakout"]["pct_teacher_ci95"] is None
    spy = _BarSpy(monkeypatch)
    assert plots.pct_of_teacher(report, tmp_path / "pct.png") == "pct.png"
    assert [c.get("label") for c in spy.calls] == [agent["label"]]  # was no bar at all


def test_a_teacher_no_better_than_random_keeps_its_percent_with_a_note(tmp_path):
    """% of teacher stays the trainers' rule (one function, report.pct_of_teacher); the report says
    when the teacher it divides by plays no better than the random policy."""
    from multitask.evaluation.compare import _teacher_notes

    e = game_entry([[3.0, 3.0, 3.0]], [0.0, 0.2, 0.1], 0.4, "minatar/Breakout", [], tmp_path, 100, 0, False)
    assert e["pct_teacher"] == pytest.approx(3000.0) and e["normalised"] is None
    notes = _teacher_notes(["minatar/Breakout"], {"minatar/Breakout": 0.4}, {"minatar/Breakout": 0.1})
    assert len(notes) == 1 and "no better than chance" in notes[0]
    # a teacher barely above random: normalised scores divide by noise (0.2 +- 0.15)
    barely = _teacher_notes(["minatar/Breakout"], {"minatar/Breakout": 0.4}, {"minatar/Breakout": 0.6},
                            {"minatar/Breakout": 0.15})
    assert len(barely) == 1 and "less than two standard errors" in barely[0]
    assert _teacher_notes(["minatar/Breakout"], {"minatar/Breakout": 0.4}, {"minatar/Breakout": 0.9},
                          {"minatar/Breakout": 0.15}) == []


def test_two_teachers_of_one_game_are_refused(tmp_path, make_teacher, run_cli):
    student = _student(tmp_path / "s.pt")
    a = make_teacher(tmp_path / "a" / "Breakout.pt", "minatar/Breakout", seed=1)
    b = make_teacher(tmp_path / "b" / "Breakout.pt", "minatar/Breakout", seed=2)
    code, out, err = run_cli("compare", student, "--teachers", a, b, "--out", tmp_path / "out", "--episodes", 2,
                             "--wandb", "off", "--no-progress")
    assert code == 2 and "two teachers of minatar/Breakout" in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_a_game_named_twice_is_compared_once(tmp_path):
    entrants = resolve_entrants([_student(tmp_path / "s.pt")])
    assert choose_games(entrants, ["minatar/Breakout", "minatar/Breakout"]) == ["minatar/Breakout"]


def test_bad_workers_device_or_cache_leave_no_out_folder(tmp_path, run_cli):
    student = _student(tmp_path / "s.pt")
    (tmp_path / "afile").write_text("")
    cases = [(["compare", student, "--workers", "0"], "--workers 0"),
             (["compare", student, "--device", "cuda"], "cuda"),  # the tests hide every GPU (conftest)
             (["compare", student, "--cache", tmp_path / "afile"], "--cache")]
    for args, words in cases:
        code, _, err = run_cli(*args, "--out", tmp_path / "out", "--episodes", 2, "--wandb", "off", "--no-progress")
        assert code == 2 and words in err and err.count("\n") == 1 and "Traceback" not in err, err
        assert not (tmp_path / "out").exists(), args
    code, _, err = run_cli("evaluate", student, "--workers", "0", "--no-progress")
    assert code == 2 and "--workers 0" in err


def test_reports_record_their_command_and_flag_different_game_sets(tmp_path, make_teacher, run_cli):
    teacher = make_teacher(tmp_path / "Breakout.pt", "minatar/Breakout", seed=1)
    both = _student(tmp_path / "both.pt", games=("minatar/Breakout", "minatar/Freeway"))
    one = _student(tmp_path / "one.pt", seed=3)
    code, out, err = run_cli("compare", both, one, "--teachers", teacher, "--out", tmp_path / "out", "--episodes", 2,
                             "--bootstrap-reps", 50, "--workers", 1, "--wandb", "off", "--no-progress")
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert "command" in report
    assert any("play different games" in n for n in report["notes"])
    assert "note: minatar/Freeway has no teacher" in out  # said on the terminal, not only in report.md
    code, _, err = run_cli("evaluate", one, "--episodes", 2, "--workers", 1, "--no-progress", "--out", tmp_path / "e.json")
    assert code == 0, err
    assert "command" in json.loads((tmp_path / "e.json").read_text())


def _report(seeds: int) -> dict:
    entry = {"mean": 2.0, "stderr": 0.5, "seeds": seeds, "episodes": 10, "pct_teacher": 40.0, "pct_teacher_ci95": [30, 50]}
    teacher = {"mean": 5.0, "stderr": 1.0, "seeds": 1, "episodes": 10, "pct_teacher": 100.0, "pct_teacher_ci95": None}
    return {"games": ["minatar/Breakout"], "episodes": 10, "random": {"minatar/Breakout": {"mean": 0.3, "stderr": 0.1}},
            "agents": [{"label": "teacher", "kind": "teacher", "games": {"minatar/Breakout": teacher}},
                       {"label": "a", "kind": "student", "games": {"minatar/Breakout": dict(entry)}},
                       {"label": "b", "kind": "student", "games": {"minatar/Breakout": dict(entry, seeds=1)}}]}


def test_raw_score_bars_are_t_intervals_over_runs_and_colours_match_across_plots(tmp_path, monkeypatch):
    assert t_multiplier(3) == pytest.approx(4.303, abs=1e-3) and t_multiplier(1) == 0.0
    spy = _BarSpy(monkeypatch)
    report = _report(seeds=3)
    plots.raw_scores(report, tmp_path / "raw.png")
    (raw,) = spy.calls
    yerr = raw["yerr"]
    assert yerr[2] == pytest.approx(t_multiplier(3) * 0.5)  # three seeds: t with 2 degrees of freedom, not 1.96
    assert yerr[3] == pytest.approx(t_multiplier(10) * 0.5) and yerr[0] == pytest.approx(t_multiplier(10) * 0.1)
    spy.calls.clear()
    plots.pct_of_teacher(report, tmp_path / "pct.png")
    assert [c["color"] for c in spy.calls] == raw["color"][2:]  # agent a and b: the same colour in both plots


def test_pipeline_reruns_the_comparison_when_a_teacher_changed(tmp_path, make_teacher, monkeypatch):
    from multitask.files import file_sha256
    from multitask.pipeline import _report_current

    monkeypatch.chdir(tmp_path)
    teacher = make_teacher(Path("teachers/minatar/Breakout.pt"), "minatar/Breakout", seed=1)
    run = tmp_path / "runs" / "student" / "s"
    run.mkdir(parents=True)
    _student(run / "best.pt")
    report = tmp_path / "results" / "q"
    report.mkdir(parents=True)
    (report / "report.json").write_text(json.dumps({
        "episodes": 4, "inputs": [{"sha256": file_sha256(run / "best.pt")}],
        "teachers": {"minatar/Breakout": {"path": str(teacher), "sha256": file_sha256(teacher)}}}))
    assert _report_current(report, [run], 4, ["minatar/Breakout"]) is not None
    make_teacher(teacher, "minatar/Breakout", seed=2)  # the teacher retrained or imported since
    assert _report_current(report, [run], 4, ["minatar/Breakout"]) is None
