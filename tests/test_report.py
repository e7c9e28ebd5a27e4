"""Result tables: percentages of teacher, geometric means, sweep layout, teacher manifest, and
`multitask report show | export | docs` (slim JSON, marked tables in Markdown, stale detection)."""

import json
from pathlib import Path

import numpy as np
import pytest

from multitask.evaluation.report import (PER_EPISODE_KEYS, geomean, pct_of_teacher, results_table, run_table,
                                         sweep_columns, sweep_table, teacher_manifest)


def summary(game, loss, size, score, teacher, frac=1.0):
    pct, geo = pct_of_teacher({game: score}, {game: teacher})
    return {"run": f"{game}-{loss}-{size}", "config": {"games": [game], "loss": loss, "size": size},
            "scores": {game: score}, "teacher_scores": {game: teacher}, "pct_teacher": pct,
            "geomean_pct_teacher": geo, "parameters": {"fraction_of_teacher": frac, "student": 1000,
                                                      "fraction_of_mean_teacher": frac},
            "updates": 10, "best_update": 10, "wall_time_s": 60.0}


def test_geomean_and_floor():
    assert geomean([100.0, 400.0]) == pytest.approx(200.0)
    assert geomean([0.0, 100.0]) == pytest.approx((0.1 * 100.0) ** 0.5)  # zero floored at 0.1%


def test_run_table_rows_and_geomean():
    s = {"scores": {"a/X": 5.0, "a/Y": 30.0}, "teacher_scores": {"a/X": 10.0, "a/Y": 20.0},
         "pct_teacher": {"a/X": 50.0, "a/Y": 150.0}, "geomean_pct_teacher": geomean([50.0, 150.0]),
         "parameters": {"student": 4000, "fraction_of_mean_teacher": 4.02}, "updates": 100,
         "best_update": 80, "wall_time_s": 120.0}
    table = run_table(s)
    assert "| a/X | 10.00 | 5.00 | 50% |" in table and "| a/Y | 20.00 | 30.00 | 150% |" in table
    s["episodes"] = {"a/X": {"stderr": 0.25}}
    assert "| a/X | 10.00 | 5.00 ± 0.25 | 50% |" in run_table(s)
    assert "**87%**" in table  # sqrt(50 * 150) = 86.6
    assert "4.02x" in table


def test_sweep_table_columns_and_seed_averaging():
    runs = [summary("a/X", "kl", "100%", 10, 10), summary("a/X", "mse", "100%", 5, 10),
            summary("a/Y", "kl", "100%", 4, 2), summary("a/Y", "mse", "100%", 1, 2),
            summary("a/Y", "mse", "100%", 3, 2)]  # a second seed of a/Y mse
    table = sweep_table(runs, "loss", ["kl", "mse"])
    assert "| a/X | 10.00 | 10.00 (100%) | 5.00 (50%) |" in table
    assert "| a/Y | 2.00 | 4.00 (200%) | 2.00 (100% [-535, 735]) [2 seeds] |" in table  # t(1) = 12.7
    assert "**141%**" in table and "**71%**" in table  # geomeans of (100, 200) and (50, 100)


def test_sweep_table_intervals_over_seeds():
    runs = []
    for seed, (x, y) in enumerate([(9, 4), (10, 4), (11, 4)]):
        for game, score, teacher in (("a/X", x, 10), ("a/Y", y, 4)):
            runs.append(summary(game, "kl", "100%", score, teacher))
            runs[-1]["config"]["seed"] = seed
    table = sweep_table(runs, "loss", ["kl"])
    # X: 90, 100, 110 % -> mean 100, s = 10, t(2) = 4.303: 100 -+ 24.8
    assert "| a/X | 10.00 | 10.00 (100% [75, 125]) [3 seeds] |" in table
    # per seed geometric means sqrt(90 * 100), sqrt(100 * 100), sqrt(110 * 100): 94.87, 100, 104.88 -> [87.5, 112.4]
    assert "**100% [87, 112]**" in table
    assert "Student-t interval over seeds" in table


def test_offline_and_student_driven_runs_side_by_side_by_method():
    offline = summary("a/X", "kl", "100%", 10, 10)
    driven = summary("a/X", "kl", "100%", 6, 10)
    driven["config"] = {"games": ["a/X"], "variant": "on_policy_distill", "size": "100%"}
    key, columns = sweep_columns([offline, driven])
    assert (key, columns) == ("method", ["offline kl", "on_policy_distill"])
    assert "| a/X | 10.00 | 10.00 (100%) | 6.00 (60%) |" in results_table([offline, driven])


def test_columns_name_every_key_the_runs_vary():
    runs = [summary("a/X", "kl", "7%", 5, 10, 0.07), summary("a/X", "kl", "7%", 6, 10, 0.07),
            summary("a/X", "kl", "4%", 4, 10, 0.04)]
    runs[1]["config"].update(shape="strided", conv_width=1.0)
    assert sweep_columns(runs) == ("size+shape", ["7% uniform", "7% strided-conv1", "4% uniform"])
    table = sweep_table(runs, *sweep_columns(runs))
    assert "| a/X | 10.00 | 5.00 (50%) | 6.00 (60%) | 4.00 (40%) |" in table
    assert "7% strided-conv1: 7.0% (1/14.3)" in table  # size among the keys: parameter fractions follow
    data = [summary("a/X", "kl", "100%", 8, 10), summary("a/X", "kl", "100%", 9, 10)]
    data[1]["config"]["datasets"] = ["datasets/minatar_envs16/X.h5"]
    assert sweep_columns(data) == ("datasets", ["default", "datasets/minatar_envs16"])
    data[1]["config"]["datasets"] = []
    data[1]["config"]["tau"], data[0]["config"]["tau"] = 0.1, 0.01
    assert sweep_columns(data) == ("tau", ["tau 0.01", "tau 0.1"])


def test_a_multi_task_run_fills_every_row_of_its_games():
    runs = []
    for seed, (x, y) in enumerate([(9, 4), (10, 4), (11, 4)]):
        pct, geo = pct_of_teacher({"a/X": x, "a/Y": y}, {"a/X": 10, "a/Y": 4})
        runs.append({"run": f"mt-s{seed}", "config": {"games": ["a/X", "a/Y"], "loss": "kl", "size": "multitask",
                                                     "seed": seed},
                     "scores": {"a/X": x, "a/Y": y}, "teacher_scores": {"a/X": 10, "a/Y": 4}, "pct_teacher": pct,
                     "geomean_pct_teacher": geo, "parameters": {"fraction_of_teacher": 3.98}})
    table = results_table(runs)
    assert "| a/X | 10.00 | 10.00 (100% [75, 125]) [3 seeds] |" in table
    assert "| a/Y | 4.00 | 4.00 (100% [100, 100]) [3 seeds] |" in table
    assert "**100% [87, 112]**" in table and "multitask: 398.0% (4.0x)" in table


def test_size_sweep_reports_parameter_fractions():
    runs = [summary("a/X", "kl", "100%", 10, 10, 1.0), summary("a/X", "kl", "7%", 9, 10, 0.0702)]
    table = sweep_table(runs, "size", ["100%", "7%"])
    assert "7%: 7.0% (1/14.2)" in table


def test_teacher_manifest_marks_targets(tmp_path):
    card = {"kind": "teacher", "game": {"name": "minatar/Breakout"}, "sha256": "ab" * 32,
            "eval": {"mean": 12.5, "std": 3.0, "episodes": 20}, "env_steps": 1_500_000,
            "wall_time_s": 1800, "cpu_time_s": 1700, "weights": "last", "command": "multitask teacher train x",
            "config": {"eval_episodes": 10}, "learning_curve": [{"env_steps": 100000, "mean": 2.0}]}
    (tmp_path / "Breakout.json").write_text(json.dumps(card))
    missed = dict(card, game={"name": "minatar/Asterix"}, eval={"mean": 7.0, "std": 1.0, "episodes": 20})
    (tmp_path / "Asterix.json").write_text(json.dumps(missed))
    text = teacher_manifest(tmp_path, {"minatar/Breakout": 10, "minatar/Asterix": 10})
    assert "| minatar/Breakout | 12.50 ± 3.00 (20) ✓ | >= 10 | 1,500,000 | 30 min | 28 min |" in text
    assert "7.00 ± 1.00 (20) ✗ (missed)" in text
    assert "100k: 2.0" in text


def full_summary(games=("a/X", "a/Y"), episodes=6, seed=0):
    """A student run's summary.json as `student train` writes it, per-episode arrays included."""
    rng = np.random.default_rng(seed)
    returns = {g: rng.integers(0, 20, episodes).astype(float).tolist() for g in games}
    scores = {g: float(np.mean(r)) for g, r in returns.items()}
    teacher = {g: 10.0 + i for i, g in enumerate(games)}
    pct, geo = pct_of_teacher(scores, teacher)
    eps = {g: {"game": g, "returns": r, "lengths": [100] * episodes, "truncated": [False] * episodes,
               "env_index": list(range(episodes)), "env_seed": 777777, "action_seed": 1778780,
               "protocol": {"epsilon": 0.05}, "episodes": episodes, "mean": scores[g],
               "std": float(np.std(r)), "min": min(r), "max": max(r),
               "stderr": float(np.std(r, ddof=1) / np.sqrt(episodes))} for g, r in returns.items()}
    return {"run": "mt", "run_dir": "runs/student/mt", "config": {"games": list(games), "loss": "kl", "size": "multitask",
                                                                  "final_eval_episodes": episodes},
            "parameters": {"student": 531521, "fraction_of_teacher": 4.0, "fraction_of_mean_teacher": 4.02},
            "updates": 100, "best_update": 50, "teacher_scores": teacher, "scores": scores, "pct_teacher": pct,
            "geomean_pct_teacher": geo, "episodes": eps, "history": [], "wall_time_s": 90.0}


def write(path, data):
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def test_export_drops_per_episode_arrays_and_keeps_the_table(tmp_path, run_cli):
    full = full_summary()
    src, out = write(tmp_path / "summary.json", full), tmp_path / "docs" / "results" / "mt.json"
    code, stdout, _ = run_cli("report", "export", src, "--out", out)
    assert code == 0 and "exported 1 run(s)" in stdout
    slim = json.loads(out.read_text())
    for g, e in slim["episodes"].items():
        assert not set(PER_EPISODE_KEYS) & set(e)
        assert {k: e[k] for k in ("mean", "std", "stderr", "min", "max")} == {
            k: full["episodes"][g][k] for k in ("mean", "std", "stderr", "min", "max")}
    assert results_table(slim) == results_table(full)


def test_export_of_several_runs_is_a_sweep(tmp_path, run_cli):
    runs = [summary("a/X", "kl", "100%", 10, 10), summary("a/X", "mse", "100%", 5, 10)]
    srcs = [write(tmp_path / f"{i}.json", r) for i, r in enumerate(runs)]
    code, _, _ = run_cli("report", "export", *srcs, "--out", tmp_path / "sweep.json")
    assert code == 0
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert isinstance(sweep, list) and len(sweep) == 2
    assert results_table(sweep) == sweep_table(runs, "loss", ["kl", "mse"])  # columns inferred, in run order


def test_show_prints_run_and_sweep_tables(tmp_path, run_cli):
    run = write(tmp_path / "summary.json", full_summary())
    sweep = write(tmp_path / "sweep.json", [summary("a/X", "kl", "100%", 10, 10), summary("a/X", "kl", "7%", 9, 10, 0.07)])
    code, out, _ = run_cli("report", "show", run, sweep)
    assert code == 0
    assert "mt (" in out and "| **geometric mean** |" in out
    assert "100%: score (% of teacher)" in out and "sweep of 2 runs" in out


def test_show_prints_a_comparison_and_a_grid_world_study(run_cli):
    docs = Path(__file__).resolve().parents[1] / "docs" / "results"
    code, out, err = run_cli("report", "show", docs / "quickstart.json", docs / "gridworld" / "counter.json")
    assert code == 0 and "Traceback" not in err, err
    assert "multitask-compare (" in out and "geometric mean % of teacher" in out
    assert "counter (" in out and "return swing" in out


def test_docs_tables_are_rewritten_and_stale_ones_detected(tmp_path, run_cli):
    (tmp_path / "docs" / "results").mkdir(parents=True)
    data = tmp_path / "docs" / "results" / "mt.json"
    write(data, full_summary())
    md = tmp_path / "docs" / "results.md"
    md.write_text("# Results\n\n<!-- table: results/mt.json -->\nhand-typed\n<!-- end table -->\n\nafter\n")
    readme = tmp_path / "README.md"
    readme.write_text("<!-- table: docs/results/mt.json -->\n<!-- end table -->\n")

    code, _, err = run_cli("report", "docs", md, readme, "--check")
    assert code == 1 and "stale" in err and "results/mt.json" in err and str(md) in err
    assert "hand-typed" in md.read_text()  # --check changes nothing

    code, out, _ = run_cli("report", "docs", md, readme)
    assert code == 0 and "rewritten" in out
    table = results_table(json.loads(data.read_text()))
    assert md.read_text() == f"# Results\n\n<!-- table: results/mt.json -->\n{table}\n<!-- end table -->\n\nafter\n"
    assert table in readme.read_text()
    assert run_cli("report", "docs", md, readme, "--check")[0] == 0

    write(data, full_summary(seed=1))  # new results, old tables
    code, _, err = run_cli("report", "docs", md, readme, "--check")
    assert code == 1 and str(readme) in err and str(md) in err


@pytest.mark.parametrize("case", ["missing", "not_json", "not_summary", "missing_table_json", "no_end_marker"])
def test_report_user_errors_are_one_sentence(tmp_path, run_cli, case):
    bad = tmp_path / "bad.json"
    md = tmp_path / "results.md"
    if case == "missing":
        args = ("report", "show", tmp_path / "nothing.json")
    elif case == "not_json":
        bad.write_text("{not json")
        args = ("report", "export", bad, "--out", tmp_path / "out.json")
    elif case == "not_summary":
        write(bad, {"games": {}})
        args = ("report", "show", bad)
    elif case == "missing_table_json":
        md.write_text("<!-- table: results/none.json -->\n<!-- end table -->\n")
        args = ("report", "docs", md)
    else:
        write(bad, full_summary())
        md.write_text("<!-- table: bad.json -->\n| old |\n")
        args = ("report", "docs", md)
    code, _, err = run_cli(*args)
    assert code == 2 and err.startswith("multitask: error: ") and err.count("\n") == 1
    assert not (tmp_path / "out.json").exists()


@pytest.mark.parametrize("sub", [[], ["show"], ["export"], ["docs"]])
def test_report_help(run_cli, sub):
    code, out, _ = run_cli("report", *sub, "--help")
    assert code == 0 and "usage: multitask report" in out


def test_teacher_manifest_shows_commands_as_typed_not_with_a_virtualenv_path(tmp_path):
    card = {"kind": "teacher", "game": {"name": "minatar/Seaquest"}, "sha256": "cd" * 32,
            "eval": {"mean": 15.0, "std": 3.0, "episodes": 20}, "weights": "last",
            "command": "/tmp/venv/bin/multitask teacher train minatar/Seaquest", "config": {"eval_episodes": 10}}
    (tmp_path / "Seaquest.json").write_text(json.dumps(card))
    text = teacher_manifest(tmp_path)
    assert "| `multitask teacher train minatar/Seaquest` |" in text
    assert "/tmp/venv" not in text


def test_recorded_commands_drop_the_program_path():
    from multitask.config import as_typed

    assert as_typed("/x/.venv/bin/multitask dataset build g") == "multitask dataset build g"
    assert as_typed("/repo/multitask/__main__.py student train") == "multitask student train"
    assert as_typed("torchrun -m multitask student train") == "torchrun -m multitask student train"
