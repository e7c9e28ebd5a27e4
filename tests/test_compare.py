"""`multitask compare`: real MinAtar evaluations at tiny sizes, the report recomputed from the
evaluation files it was built from, the cache, the refusals, the plots, the W&B table; and the
statistics as pure functions."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch

from multitask.agents.checkpoints import save_agent
from multitask.agents.networks import MultiHeadNet, NetworkSpec, TrunkSpec
from multitask.evaluation import statistics as st
from multitask.evaluation.compare import compare, game_entry
from multitask.evaluation.reference import ATARI_RANDOM_HUMAN, human_reference
from multitask.evaluation.report import GEOMEAN_FLOOR, pct_of_teacher
from multitask.envs import get_game, known_games

GAMES = ("minatar/Breakout", "minatar/Freeway")
EPISODES = 6
SEED = 4242
REPS = 300
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _student(path: Path, games=GAMES, seed: int = 0) -> Path:
    """A tiny randomly initialised two-head student (MinAtar inputs padded to 10 channels)."""
    torch.manual_seed(seed)
    net = MultiHeadNet(NetworkSpec(TrunkSpec("minatar", 10, 10, width=0.25), tuple(games),
                                    tuple(get_game(g).num_actions for g in games)))
    save_agent(path, net, "student", {"source": "test"})
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory, make_teacher):
    root = tmp_path_factory.mktemp("compare")
    teachers = [make_teacher(root / "teachers" / f"{g.split('/')[1]}.pt", g, seed=1) for g in GAMES]
    run = root / "runs" / "student" / "tiny"
    run.mkdir(parents=True)
    _student(run / "best.pt")
    lines = [{"updates": u, "loss": 1.0 / u, "eval/minatar/Breakout/score": 0.1 * u, "eval/minatar/Freeway/score": u}
             for u in (10, 20, 30)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"updates": 40, "ev')  # killed mid-line
    other = _student(root / "other.pt", games=("minatar/Breakout",), seed=3)
    out = root / "out"
    report = compare([run, other], out, episodes=EPISODES, seed=SEED, teachers=teachers, workers=1, reps=REPS,
                     wandb="off", show_progress=False)
    return {"root": root, "teachers": teachers, "run": run, "other": other, "out": out, "report": report}


def _returns(out: Path, entry: dict) -> list[float]:
    path = entry["evaluation"] if "evaluation" in entry else entry["evaluations"][0]
    return json.loads((out / path).read_text())["scores"]["returns"]


def test_report_numbers_recomputed_from_the_evaluation_files(setup):
    out, report = setup["out"], setup["report"]
    assert json.loads((out / "report.json").read_text()) == report
    random = {g: float(np.mean(_returns(out, report["random"][g]))) for g in GAMES}
    teacher = next(a for a in report["agents"] if a["kind"] == "teacher")
    teacher_mean = {g: float(np.mean(_returns(out, teacher["games"][g]))) for g in GAMES}
    assert [a["label"] for a in report["agents"]] == ["teacher", "tiny", "other"]
    for agent in report["agents"]:
        pcts, columns = [], []
        for g, e in agent["games"].items():
            assert e["seeds"] == 1 and len(e["evaluations"]) == len(e["members"]) == 1
            data = json.loads((out / e["evaluations"][0]).read_text())
            assert data["key"]["sha256"] == e["members"][0]["sha256"] and data["key"]["episodes"] == EPISODES
            assert data["key"]["seed"] == SEED and data["key"]["game"] == g
            r = np.asarray(data["scores"]["returns"], dtype=float)
            assert len(r) == EPISODES
            assert e["mean"] == pytest.approx(r.mean())
            assert e["stderr"] == pytest.approx(r.std(ddof=1) / math.sqrt(len(r)))
            t, lo = teacher_mean[g], random[g]
            assert e["pct_teacher"] == (pytest.approx(100 * r.mean() / t) if t > 0 else None)
            assert e["normalised"] == (pytest.approx((r.mean() - lo) / (t - lo)) if t > lo else None)
            if e["pct_teacher"] is not None:
                pcts.append(e["pct_teacher"])
            if t > lo:
                columns.append((r - lo) / (t - lo))
        agg = agent["aggregates"]
        if len(pcts) == len(agent["games"]):
            expected = math.exp(np.mean([math.log(max(p, GEOMEAN_FLOOR)) for p in pcts]))
            assert agg["geomean_pct_teacher"] == pytest.approx(expected)
        else:
            assert agg["geomean_pct_teacher"] is None
        if columns:
            iqm = agg["iqm_normalised"]
            assert iqm["value"] == pytest.approx(scipy.stats.trim_mean(np.stack(columns, 1), 0.25, axis=None))
            assert iqm["runs"] == EPISODES and iqm["ci95"][0] <= iqm["ci95"][1]
        else:
            assert agg["iqm_normalised"] is None
    assert teacher["games"]["minatar/Freeway"]["pct_teacher"] == pytest.approx(100.0)
    assert report["episodes"] == EPISODES and report["seed"] == SEED
    assert {i["sha256"] for i in report["inputs"]} == {m["sha256"] for a in report["agents"][1:]
                                                        for e in a["games"].values() for m in e["members"]}
    assert "Freeway" in (out / "report.md").read_text() and "IQM" in (out / "report.md").read_text()


def test_an_agent_plays_only_its_games_and_runs_give_learning_curves(setup):
    report = setup["report"]
    tiny, other = report["agents"][1], report["agents"][2]
    assert list(other["games"]) == ["minatar/Breakout"] and list(tiny["games"]) == list(GAMES)
    curve = tiny["learning_curves"]["minatar/Freeway"]
    assert curve == {"step_metric": "updates", "steps": [10, 20, 30], "scores": [10.0, 20.0, 30.0]}
    assert other["learning_curves"] == {}
    assert "| minatar/Freeway |" in (setup["out"] / "report.md").read_text()


def test_plots_are_valid_pngs(setup):
    import matplotlib.image

    out = setup["out"]
    assert sorted(setup["report"]["plots"]) == ["learning_curves.png", "pct_of_teacher.png", "raw_scores.png"]
    for name in setup["report"]["plots"]:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
        image = matplotlib.image.imread(out / name)
        assert image.shape[0] > 100 and image.shape[1] > 100


def test_wandb_offline_run_holds_the_table_and_chart(setup):
    out = setup["root"] / "wandb"
    report = compare([setup["run"], setup["other"]], out, episodes=EPISODES, seed=SEED, teachers=setup["teachers"],
                     workers=1, reps=REPS, wandb="offline", show_progress=False, cache_dir=setup["out"] / "evaluations")
    assert report["evaluations"]["evaluated"] == 0
    assert not (setup["out"] / "wandb").exists()  # --wandb off wrote nothing
    files = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    data = files[0].read_bytes()
    assert b"compare/table" in data and b"compare/table_bar" in data
    assert b"compare/tiny/geomean_pct_teacher" in data


def test_cache_is_reused_only_for_the_same_checkpoint_episodes_seed_and_protocol(setup):
    out, root = setup["out"], setup["root"]
    files = sorted((out / "evaluations").glob("*.json"))
    assert len(files) == 7  # random x2, teachers x2, tiny x2, other x1
    mtimes = {f: f.stat().st_mtime_ns for f in files}
    args = dict(episodes=EPISODES, seed=SEED, teachers=setup["teachers"], workers=1, reps=REPS, wandb="off",
                show_progress=False, cache_dir=out / "evaluations")
    again = compare([setup["run"], setup["other"]], root / "again", **args)
    assert again["evaluations"] == {"evaluated": 0, "reused": 7}
    assert {f: f.stat().st_mtime_ns for f in files} == mtimes
    assert [a["aggregates"] for a in again["agents"]] == [a["aggregates"] for a in setup["report"]["agents"]]

    # a cache file whose stored key differs (another checkpoint's evaluation put under this name) is evaluated again
    victim = next(f for f in files if "-random-" not in f.name)
    data = json.loads(victim.read_text())
    data["key"]["sha256"] = "0" * 64
    victim.write_text(json.dumps(data))
    tampered = compare([setup["run"], setup["other"]], root / "tampered", **args)
    assert tampered["evaluations"] == {"evaluated": 1, "reused": 6}

    other_seed = compare([setup["other"]], root / "seed", **{**args, "seed": SEED + 1})
    assert other_seed["evaluations"] == {"evaluated": 3, "reused": 0}  # random, teacher, other: Breakout only
    other_episodes = compare([setup["other"]], root / "episodes", **{**args, "episodes": EPISODES + 1})
    assert other_episodes["evaluations"]["reused"] == 0


def _seed_run(root: Path, name: str, seed: int, loss: str = "kl", extra: str = "") -> Path:
    """A tiny finished run folder: best.pt, its config.toml and a learning curve."""
    run = root / name
    run.mkdir(parents=True)
    _student(run / "best.pt", seed=100 + seed + (50 if loss == "nll" else 0))  # weights no other test has
    (run / "config.toml").write_text(f'games = {json.dumps(list(GAMES))}\nname = ""\nseed = {seed}\nloss = "{loss}"\n'
                                     f'eval_workers = {seed + 1}\n{extra}')
    (run / "metrics.jsonl").write_text("".join(json.dumps({"updates": u, "eval/minatar/Breakout/score": u * (seed + 1)})
                                               + "\n" for u in (10, 20)))
    return run


@pytest.mark.slow
def test_seeds_of_one_config_are_pooled_into_one_column(setup):
    root = setup["root"] / "seeds"
    # seed 2 was saved by newer code, with a key the others lack at its default: still one method
    runs = [_seed_run(root, f"minatar-2games-kl-tiny-s{s}", s, extra="control = []\n" if s == 2 else "")
            for s in (0, 1, 2)]
    other_loss = _seed_run(root, "minatar-2games-nll-tiny-s0", 0, loss="nll")
    args = dict(episodes=EPISODES, seed=SEED, teachers=setup["teachers"], workers=1, reps=REPS, wandb="off",
                show_progress=False, cache_dir=setup["out"] / "evaluations")
    out = root / "out"
    report = compare([*runs, other_loss], out, **args)
    assert [a["label"] for a in report["agents"]] == ["teacher", "minatar-2games-kl-tiny", "minatar-2games-nll-tiny-s0"]
    pooled = report["agents"][1]
    assert pooled["seeds"] == [0, 1, 2] and report["agents"][2]["seeds"] == [0]
    assert len(report["inputs"]) == 4 and report["evaluations"]["evaluated"] == 2 * 4
    teacher = report["agents"][0]["games"]
    for g, e in pooled["games"].items():
        per_seed = [np.asarray(_returns(out, {"evaluation": f}), dtype=float) for f in e["evaluations"]]
        means = np.array([r.mean() for r in per_seed])
        assert [m["seed"] for m in e["members"]] == [0, 1, 2] and e["seed_means"] == pytest.approx(list(means))
        assert e["mean"] == pytest.approx(means.mean())
        assert e["stderr"] == pytest.approx(means.std(ddof=1) / math.sqrt(3))  # over seeds, not episodes
        t = teacher[g]["mean"]
        if t > 0:
            assert e["pct_teacher"] == pytest.approx(100 * means.mean() / t)
    iqm = pooled["aggregates"]["iqm_normalised"]
    if iqm is not None:
        assert iqm["runs"] == 3 and iqm["runs_are"].startswith("seeds")
    curve = pooled["learning_curves"]["minatar/Breakout"]
    assert curve["steps"] == [10, 20] and curve["scores"] == [20.0, 40.0] and curve["low"] == [10.0, 20.0]
    assert curve["high"] == [30.0, 60.0] and curve["runs"] == 3
    assert "3 seeds (0, 1, 2)" in (out / "report.md").read_text()

    separate = compare(runs, root / "separate", **args, pool_seeds=False)
    assert [a["label"] for a in separate["agents"][1:]] == [r.name for r in runs]
    assert separate["evaluations"]["evaluated"] == 0  # the same checkpoints: all from the cache


def test_default_teachers_and_a_missing_teacher(tmp_path, make_teacher, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_teacher(Path("teachers/minatar/Breakout.pt"), "minatar/Breakout", seed=1)
    student = _student(tmp_path / "s.pt", games=("minatar/Breakout", "minatar/Asterix"))
    report = compare([student], tmp_path / "out", episodes=4, seed=1, workers=1, reps=100, wandb="off",
                     show_progress=False)
    assert list(report["teachers"]) == ["minatar/Breakout"]
    s = report["agents"][1]
    assert s["games"]["minatar/Asterix"]["pct_teacher"] is None and s["games"]["minatar/Asterix"]["normalised"] is None
    assert s["aggregates"]["geomean_pct_teacher"] is None
    assert any("minatar/Asterix has no teacher" in n for n in report["notes"])


def test_agents_for_other_games_or_another_suite_are_refused(tmp_path, make_teacher, run_cli):
    student = _student(tmp_path / "s.pt")
    pong = make_teacher(tmp_path / "Pong.pt", "atari/Pong")
    cases = [
        ([student, "--games", "minatar/Asterix"], "none of the compared games"),
        ([student, pong], "mix suites"),
        ([student, "--games", "atari/Pong"], "none of the compared games"),
        ([student, "--games", "minatar/Breakout", "atari/Pong"], "mixes suites"),
        ([tmp_path], "has no best.pt"),
        ([student, "--teachers", pong], "is not a minatar teacher"),
    ]
    for args, words in cases:
        code, out, err = run_cli("compare", *args, "--out", tmp_path / "out", "--wandb", "off", "--no-progress")
        assert code == 2, err
        assert words in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out" / "report.json").exists()


# ---- statistics: pure functions -----------------------------------------------------------------

def test_percent_of_teacher_rule_for_zero_and_negative_scores():
    pct, geo = pct_of_teacher({"a": 5.0, "b": 0.0, "c": -3.0}, {"a": 10.0, "b": 4.0, "c": 6.0})
    assert pct == {"a": 50.0, "b": 0.0, "c": -50.0}
    assert geo == pytest.approx((50.0 * GEOMEAN_FLOOR * GEOMEAN_FLOOR) ** (1 / 3))  # 0% and -50% floored at 0.1%
    for bad in (0.0, -20.0, None):
        pct, geo = pct_of_teacher({"a": 5.0, "b": -10.0}, {"a": 10.0, "b": bad})
        assert pct == {"a": 50.0} and geo is None


def test_normalised_scores():
    assert st.normalised_score(6.0, 1.0, 11.0) == pytest.approx(0.5)
    assert st.normalised_score(-4.0, 1.0, 11.0) == pytest.approx(-0.5)
    assert st.normalised_score(20.0, 1.0, 11.0) == pytest.approx(1.9)
    for low, high in ((5.0, 5.0), (5.0, 2.0), (None, 3.0), (1.0, None)):
        assert st.normalised_score(3.0, low, high) is None
        assert st.normalised_episodes([1.0, 2.0], low, high) is None
    np.testing.assert_allclose(st.normalised_episodes([1.0, 3.0], 1.0, 5.0), [0.0, 0.5])


def test_score_matrix_and_iqm_interval():
    m, games = st.score_matrix({"a": np.arange(8.0), "b": None, "c": np.ones(8)})
    assert games == ["a", "c"] and m.shape == (8, 2) and m[3, 0] == 3.0
    assert st.score_matrix({"a": None}) == (None, [])
    with pytest.raises(ValueError):
        st.score_matrix({"a": np.ones(3), "b": np.ones(4)})
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3))
    iqm, lo, hi = st.iqm_interval(x, reps=500, seed=1)
    assert iqm == pytest.approx(scipy.stats.trim_mean(x, 0.25, axis=None))
    assert lo < iqm < hi
    assert st.iqm_interval(x, reps=500, seed=1) == (iqm, lo, hi)  # seeded: reproducible
    state = np.random.get_state()[1].copy()
    st.iqm_interval(x, reps=50, seed=2)
    assert (np.random.get_state()[1] == state).all()  # the global generator is left as it was


def test_ratio_interval():
    assert st.ratio_interval([1.0, 2.0], [0.0, 0.0], reps=50, seed=0) is None
    assert st.ratio_interval([1.0, 2.0], [-1.0, -3.0], reps=50, seed=0) is None
    assert st.ratio_interval([4.0] * 5, [8.0] * 5, reps=50, seed=0) == pytest.approx((50.0, 50.0))
    lo, hi = st.ratio_interval([1.0, 5.0, 3.0, 4.0, 2.0], [3.0, 2.0, 4.0, 3.0, 3.0], reps=500, seed=0)
    assert lo < 100.0 < hi


def test_atari_reference_table_and_human_normalised_score(tmp_path):
    assert len(ATARI_RANDOM_HUMAN) == 57 and set(ATARI_RANDOM_HUMAN) <= set(known_games("atari"))
    assert human_reference("atari/Pong") == (-20.7, 14.6) and human_reference("atari/Breakout") == (1.7, 30.5)
    assert human_reference("atari/MsPacman") == (307.3, 6951.6) and human_reference("minatar/Breakout") is None
    e = game_entry([[-10.0, -12.0]], [10.0, 12.0], -21.0, "atari/Pong", [tmp_path / "x.json"], tmp_path, 50, 0, False)
    assert e["human_normalised"] == pytest.approx((-11.0 + 20.7) / (14.6 + 20.7))
    assert e["pct_teacher"] == pytest.approx(-100.0) and e["normalised"] == pytest.approx(10.0 / 32.0)


def test_a_comparison_report_is_a_docs_table(setup, run_cli, tmp_path):
    from multitask.evaluation.report import load_results, results_table

    report = load_results(setup["out"] / "report.json")
    table = results_table(report)
    tiny = next(a for a in report["agents"] if a["label"] == "tiny")
    pct = tiny["games"]["minatar/Breakout"]["pct_teacher"]
    assert "| game | teacher | tiny | other |" in table and "geometric mean % of teacher" in table
    assert ("-" if pct is None else f"{pct:.0f}%") in table.split("| minatar/Breakout |")[1].split("\n")[0]
    md = tmp_path / "results.md"
    md.write_text(f"<!-- table: {setup['out'] / 'report.json'} -->\n<!-- end table -->\n")
    code, out, err = run_cli("report", "docs", md)
    assert code == 0, err
    assert table in md.read_text()


def test_curve_labels_drop_the_panels_game_so_one_legend_serves_every_panel():
    from multitask.evaluation.plots import _curve_label

    assert _curve_label("minatar-Seaquest-on-policy-distill-100pct", "minatar/Seaquest") == "on-policy-distill-100pct"
    assert _curve_label("minatar-3games-kl-multitask", "minatar/Seaquest") == "minatar-3games-kl-multitask"
