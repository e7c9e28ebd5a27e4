"""Result tables: percentages of teacher, geometric means, sweep layout, teacher manifest."""

import json

import pytest

from multitask.evaluation.report import geomean, pct_of_teacher, run_table, sweep_table, teacher_manifest


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
    assert "**87%**" in table  # sqrt(50 * 150) = 86.6
    assert "4.02x" in table


def test_sweep_table_columns_and_seed_averaging():
    runs = [summary("a/X", "kl", "100%", 10, 10), summary("a/X", "mse", "100%", 5, 10),
            summary("a/Y", "kl", "100%", 4, 2), summary("a/Y", "mse", "100%", 1, 2),
            summary("a/Y", "mse", "100%", 3, 2)]  # a second seed of a/Y mse
    table = sweep_table(runs, "loss", ["kl", "mse"])
    assert "| a/X | 10.00 | 10.00 (100%) | 5.00 (50%) |" in table
    assert "| a/Y | 2.00 | 4.00 (200%) | 2.00 (100%) [2 seeds] |" in table
    assert "**141%**" in table and "**71%**" in table  # geomeans of (100, 200) and (50, 100)


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
