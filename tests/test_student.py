"""Offline distillation end to end on real datasets: loader, student, resume, DDP, bad input."""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from multitask import config as configlib
from multitask.agents.checkpoints import load_agent
from multitask.errors import UserError
from multitask.data.loader import LoaderSpec, make_loader, plan
from multitask.data.build import build_dataset
from multitask.data.build_config import DatasetConfig
from multitask.data.reader import DatasetReader
from multitask.evaluation.report import pct_of_teacher
from multitask.agents.sizes import sized_network
from multitask.training.student import StudentConfig, cosine_lr, train_student
from multitask.envs import get_game

GAMES = ("minatar/Breakout", "minatar/Freeway")  # 4 and 7 channels: the trunk pads to 7


@pytest.fixture(scope="module")
def data(tmp_path_factory, make_teacher):
    tmp = tmp_path_factory.mktemp("student")
    paths, teachers = [], []
    for i, game in enumerate(GAMES):
        teacher = make_teacher(tmp / f"{game.split('/')[1]}.pt", game, seed=i, eval_mean=2.0)
        out = tmp / f"{game.split('/')[1]}.h5"
        build_dataset(game, teacher, out, DatasetConfig(steps=3000 + 1000 * i, num_envs=8), show_progress=False)
        paths.append(str(out))
        teachers.append(str(teacher))
    return tmp, paths, teachers


def config(data, **over) -> StudentConfig:
    tmp, paths, teachers = data
    base = dict(games=GAMES, datasets=tuple(paths), teachers=tuple(teachers), updates=60, batch_size=32,
                eval_every=30, eval_episodes=2, final_eval_episodes=2, checkpoint_every=20, log_every=10,
                loader_workers=0, eval_workers=1, lr=1e-3, optimizer="adam", num_threads=1)
    base.update(over)
    return StudentConfig(**base)


def test_batches_are_deterministic_balanced_and_exact(data):
    _, paths, _ = data
    spec = LoaderSpec(tuple(paths), 16, "per_game", seed=3, channels=7, memory_budget=1 << 30, workers=0)
    a = [b for _, b in zip(range(8), make_loader(spec))]
    b = [b for _, b in zip(range(4), make_loader(spec, start=4))]
    for x, y in zip(a[4:], b):  # batch k does not depend on where iteration started
        assert x.index == y.index and torch.equal(x.obs, y.obs) and torch.equal(x.teacher[0], y.teacher[0])
    for cycle in range(4):  # every cycle of 2 batches visits both games once
        assert sorted(a[2 * cycle + j].groups[0][0] for j in range(2)) == [0, 1]
    assert all(x.obs.shape == (16, 7, 10, 10) and x.obs.dtype == torch.uint8 for x in a)
    mixed = next(make_loader(LoaderSpec(tuple(paths), 17, "mixed", 3, 7, 1 << 30, workers=0)))
    assert [(g, e - s) for g, s, e in mixed.groups] == [(0, 9), (1, 8)]
    assert plan(LoaderSpec(tuple(paths), 17, "mixed", 3, 7, 1), 0, 2) == [(0, 9), (1, 8)]


def test_worker_processes_and_chunk_windows_give_the_same_kind_of_data(data):
    """Under a tiny memory budget the loader reads windows of chunks; every row it returns is a
    real (observation, teacher output) pair of the dataset."""
    _, paths, _ = data
    with DatasetReader(paths[1]) as d:  # Freeway
        real = {d.obs([i])[0].tobytes(): d.steps["teacher_outputs"][i] for i in range(len(d))}
        frames_bytes = d.frames_nbytes
    spec = LoaderSpec((paths[1],), 64, "per_game", seed=0, channels=7, memory_budget=frames_bytes // 8,
                      workers=2, window_batches=3)
    seen = 0
    for _, batch in zip(range(12), make_loader(spec)):
        for row in range(len(batch.obs)):
            q = real.get(batch.obs[row].numpy().tobytes())
            assert q is not None and np.array_equal(q, batch.teacher[0][row].numpy())
            seen += 1
    assert seen == 12 * 64


@pytest.mark.parametrize("workers", [0, 2])
def test_windowed_batches_do_not_depend_on_where_iteration_started(data, workers):
    """A dataset over its memory budget is read through windows of chunks; batch k must still be the
    same batch when a resumed run starts iterating at k (the window follows k, not a count of the
    batches this process has made), or a killed run does not resume to the same weights."""
    _, paths, _ = data
    with DatasetReader(paths[1]) as d:
        frames_bytes = d.frames_nbytes
    spec = LoaderSpec(tuple(paths), 16, "per_game", seed=1, channels=7, memory_budget=frames_bytes // 4,
                      workers=workers, window_batches=3)
    straight = make_loader(spec, start=0, stop=20)
    a = list(straight)
    straight.close()
    for start in (5, 7):
        resumed = make_loader(spec, start=start, stop=20)
        b = list(resumed)
        resumed.close()
        assert [x.index for x in b] == list(range(start, 20))
        for x, y in zip(a[start:], b):
            assert torch.equal(x.obs, y.obs) and torch.equal(x.teacher[0], y.teacher[0]), (start, x.index)


@pytest.fixture(scope="module")
def multitask_run(data):
    """One multi-task-sized student, mixed batches, evaluated at updates 30 and 60; its stderr kept."""
    tmp, _, _ = data
    run = tmp / "run-mt"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        summary = train_student(config(data, batch_mode="mixed", size="multitask"), run, wandb_mode="offline",
                                show_progress=False)
    return run, summary, err.getvalue()


@pytest.mark.slow
def test_student_trains_writes_checkpoints_summary_and_wandb(multitask_run):
    run, summary, _ = multitask_run
    assert set(summary["scores"]) == set(GAMES)
    assert summary["teacher_card_scores"] == {g: 2.0 for g in GAMES}  # what the cards say
    measured = summary["teacher_scores"]  # the teachers re-scored on the student's final episodes
    assert set(measured) == set(GAMES) and all(v is not None for v in measured.values())
    assert list((run.parent / ".teacher_scores").glob("*.json"))  # cached for the next run
    if all(v > 0 for v in measured.values()):
        assert summary["geomean_pct_teacher"] is not None
    assert summary["parameters"]["fraction_of_mean_teacher"] == pytest.approx(4.0, rel=0.05)
    for name in ("best.pt", "last.pt"):
        agent = load_agent(run / name)
        assert agent.kind == "student" and agent.net.games == GAMES
        assert agent.net.spec.trunk.extra_fc == 1 and agent.net.spec.trunk.in_channels == 7
    wandb_file = next((run / "wandb").glob("offline-run-*/run-*.wandb")).read_bytes()
    for key in (b"eval/minatar/Breakout/score", b"eval/minatar/Freeway/pct_teacher", b"eval/geomean_pct_teacher",
                b"train/minatar/Freeway/loss", b"train/samples_per_s"):
        assert key in wandb_file
    saved = configlib.from_dict(StudentConfig, json.loads((run / "summary.json").read_text())["config"])
    assert saved.batch_mode == "mixed" and saved.loss == "kl"


@pytest.mark.slow
def test_every_evaluation_prints_one_line_with_scores_and_geomean(multitask_run):
    _, summary, err = multitask_run
    lines = [line for line in err.splitlines() if line.startswith("eval ")]
    assert len(lines) == len(summary["history"]) == 2, err
    for line, entry in zip(lines, summary["history"]):
        assert f"update {entry['update']}" in line and "geometric mean" in line
        assert all(f"{g.split('/')[1]} {entry['scores'][g]:.2f}" in line for g in GAMES), line
        assert all(f"({entry['pct_teacher'][g]:.0f}%)" in line for g in GAMES), line


@pytest.mark.slow
def test_final_evaluation_is_logged_like_the_periodic_ones(multitask_run):
    run, summary, _ = multitask_run
    logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in logged if "eval/minatar/Breakout/score" in x]
    assert [x["updates"] for x in evals] == [h["update"] for h in summary["history"]] == [30, 60]
    assert all("eval/geomean_pct_teacher" in x and "eval/minatar/Freeway/pct_teacher" in x for x in evals)


@pytest.mark.slow
def test_saved_config_is_the_architecture_built(multitask_run):
    run, summary, _ = multitask_run
    trunk = load_agent(run / "best.pt").net.spec.trunk
    saved = configlib.load(StudentConfig, run / "config.toml")
    assert saved.size == "multitask" and (saved.width, saved.extra_fc) == (trunk.width, trunk.extra_fc)
    assert trunk.width > 1.5 and trunk.extra_fc == 1
    state = torch.load(run / "state.pt", map_location="cpu", weights_only=True)
    card = json.loads((run / "best.json").read_text())
    assert state["config"] == card["config"] == summary["config"] == configlib.to_dict(saved)


def test_evaluate_cli_scores_a_student(data, run_cli):
    tmp, _, _ = data
    run = tmp / "run-eval"
    train_student(config(data, updates=20, eval_every=0), run, wandb_mode="off", show_progress=False)
    code, out, err = run_cli("evaluate", run / "best.pt", "--episodes", 2, "--workers", 1, "--no-progress")
    assert code == 0, err
    assert "minatar/Breakout" in out and "minatar/Freeway" in out


def test_size_presets_hit_their_parameter_fractions():
    games = [get_game("minatar/Breakout")]
    for size, frac in (("100%", 1.0), ("25%", 0.25), ("7%", 0.07), ("4%", 0.04)):
        spec, sized = sized_network(size, games)
        assert sized.fraction_of_teacher == pytest.approx(frac, rel=0.06), size
    spec, sized = sized_network("7%", [get_game("atari/Pong")])
    assert sized.fraction_of_teacher == pytest.approx(0.07, rel=0.03) and spec.trunk.kind == "nature"


def test_cosine_schedule_by_hand():
    assert cosine_lr(1e-3, 0, 100) == pytest.approx(1e-3)
    assert cosine_lr(1e-3, 50, 100) == pytest.approx(5e-4)  # (1 + cos(pi / 2)) / 2 = 1/2
    assert cosine_lr(1e-3, 25, 100) == pytest.approx(1e-3 * (1 + 2 ** -0.5) / 2)  # cos(pi / 4) = 1/sqrt(2)
    assert cosine_lr(1e-3, 100, 100) == pytest.approx(0.0, abs=1e-15)


def test_pct_of_teacher_and_geomean():
    pct, geo = pct_of_teacher({"a": 10.0, "b": 40.0}, {"a": 10.0, "b": 20.0})
    assert pct == {"a": 100.0, "b": 200.0} and geo == pytest.approx(np.sqrt(100 * 200))
    assert pct_of_teacher({"a": 1.0}, {"a": None})[1] is None


def _train_cmd(data, run, updates, *extra):
    _, paths, teachers = data
    return [sys.executable, "-m", "multitask", "student", "train", f"games={','.join(GAMES)}",
            f"datasets={','.join(paths)}", f"teachers={','.join(teachers)}", f"updates={updates}",
            "batch_size=32", "eval_every=0", "eval_episodes=1", "final_eval_episodes=1", "checkpoint_every=25",
            "log_every=25", "loader_workers=1", "eval_workers=1", "num_threads=1", "device=cpu", "optimizer=adam",
            "lr=1e-3", *extra, "--run-dir", str(run), "--wandb", "off", "--no-progress"]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(data):
    """With loss_norm, whose running means state.pt must carry for the resume to be exact."""
    tmp, _, _ = data

    def cmd(run):
        return _train_cmd(data, run, 150, "loss_norm=true")

    straight = subprocess.run(cmd(tmp / "straight"), capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr
    proc = subprocess.Popen(cmd(tmp / "killed"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = tmp / "killed" / "state.pt"
    deadline = time.time() + 300
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert state.exists() and not (tmp / "killed" / "last.pt").exists()
    resumed = subprocess.run(cmd(tmp / "killed"), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    a = load_agent(tmp / "straight" / "last.pt").net.state_dict()
    b = load_agent(tmp / "killed" / "last.pt").net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_torchrun_two_cpu_processes_keep_identical_replicas(data):
    tmp, _, _ = data
    run = tmp / "ddp"
    # device=cpu: two processes on the CPU whatever GPUs the machine has (auto on a one-GPU machine
    # would be refused: two processes, one GPU)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
           "-m"] + _train_cmd(data, run, 40)[2:] + ["device=cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and len(summary["replica_checksums"]) == 2
    assert summary["config"]["device"] == "cpu"
    assert summary["replicas_identical"]
    single = load_agent(run / "last.pt").net
    assert all(torch.isfinite(p).all() for p in single.parameters())


@pytest.mark.slow
def test_a_torchrun_run_with_loss_norm_resumes_to_the_weights_of_an_uninterrupted_one(data):
    """Each process kept running means of its own losses and state.pt held rank 0's, so a resumed
    process 1 divided by other means than before; the means now follow the losses' mean over processes."""
    tmp, _, _ = data

    def torchrun(run, updates):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29518",
               "-m"] + _train_cmd(data, run, updates, "loss_norm=true")[2:]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-3000:]

    torchrun(tmp / "ddp-straight", 50)
    torchrun(tmp / "ddp-resumed", 25)  # checkpoint at 25, then the same run continued to 50
    torchrun(tmp / "ddp-resumed", 50)
    a = load_agent(tmp / "ddp-straight" / "last.pt").net.state_dict()
    b = load_agent(tmp / "ddp-resumed" / "last.pt").net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_inputs(data, run_cli, tmp_path):
    _, paths, teachers = data
    code, _, err = run_cli("student", "train", "games=minatar/Breakout,atari/Pong", "--wandb", "off")
    assert code == 2 and "different suites" in err
    code, _, err = run_cli("student", "train", "games=minatar/Asterix", f"datasets={tmp_path / 'none.h5'}")
    assert code == 2 and "no dataset for minatar/Asterix" in err
    code, _, err = run_cli("student", "train", "games=minatar/Breakout", "temperature=0.1")
    assert code == 2 and "unknown config key 'temperature'" in err
    stripped = tmp_path / "no_outputs.h5"
    stripped.write_bytes(Path(paths[0]).read_bytes())
    with h5py.File(stripped, "a") as f:
        del f["steps/teacher_outputs"]
    code, _, err = run_cli("student", "train", "games=minatar/Breakout", f"datasets={stripped}")
    assert code == 2 and "no teacher outputs" in err
    code, _, err = run_cli("student", "train", "games=minatar/Breakout", f"datasets={paths[1]}")
    assert code == 2 and "holds minatar/Freeway" in err


def test_a_dataset_that_fails_verification_is_refused_before_training(data, run_cli, tmp_path):
    """NaN teacher outputs would train the student to NaN weights; a damaged file is named up front."""
    _, paths, teachers = data
    damaged = tmp_path / "nan.h5"
    damaged.write_bytes(Path(paths[0]).read_bytes())
    with h5py.File(damaged, "a") as f:
        f["steps/teacher_outputs"][7, 1] = np.nan
    run = tmp_path / "run"
    code, _, err = run_cli("student", "train", "games=minatar/Breakout", f"datasets={damaged}",
                           f"teachers={teachers[0]}", "updates=20", "eval_every=0", "final_eval_episodes=1",
                           "loader_workers=0", "--wandb", "off", "--no-progress", "--run-dir", run)
    assert code == 2 and f"dataset {damaged} fails verification" in err and "NaN" in err, err
    assert not run.exists()


def test_a_cosine_run_is_not_resumed_with_another_budget(data, tmp_path, capsys):
    """Cosine decay is a function of `updates`: a finished (or killed) run resumed with more updates
    would restart the decay from mid-way, a schedule neither budget has. A constant rate may extend."""
    small = dict(updates=12, games=GAMES[:1], datasets=(data[1][0],), teachers=(data[2][0],), eval_every=0,
                 checkpoint_every=6, final_eval_episodes=1, batch_size=16)
    train_student(config(data, **small, lr_schedule="cosine"), tmp_path / "cos", wandb_mode="off",
                  show_progress=False)
    lrs = [x["train/lr"] for x in map(json.loads, (tmp_path / "cos" / "metrics.jsonl").read_text().splitlines())
           if "train/lr" in x]
    cfg = config(data, **small, lr_schedule="cosine")
    assert lrs and lrs[-1] == pytest.approx(cosine_lr(cfg.lr, 11, 12))  # the rate of the last update, logged
    with pytest.raises(UserError, match="updates 12 then, 24 now"):
        train_student(config(data, **{**small, "updates": 24}, lr_schedule="cosine"), tmp_path / "cos",
                      wandb_mode="off", show_progress=False)
    train_student(config(data, **small), tmp_path / "const", wandb_mode="off", show_progress=False)
    summary = train_student(config(data, **{**small, "updates": 24}), tmp_path / "const", wandb_mode="off",
                            show_progress=False)
    assert summary["updates"] == 24 and "resuming" in capsys.readouterr().err


@pytest.mark.slow
def test_rerun_resumes_a_preset_run_and_another_architecture_is_refused(data, tmp_path, capsys):
    """The saved config holds the width the preset built; the same command again compares like with
    like, and so does a run saved before (its config said width 1.0)."""
    run = tmp_path / "arch"
    train_student(config(data, updates=20, eval_every=0, size="multitask"), run, wandb_mode="off", show_progress=False)
    summary = train_student(config(data, updates=30, eval_every=0, size="multitask"), run, wandb_mode="off",
                            show_progress=False)
    assert "resuming" in capsys.readouterr().err and summary["updates"] == 30
    state = torch.load(run / "state.pt", weights_only=True)
    state["config"].update(width=1.0, extra_fc=0)  # what a multitask run saved before the fix
    torch.save(state, run / "state.pt")
    summary = train_student(config(data, updates=40, eval_every=0, size="multitask"), run, wandb_mode="off",
                            show_progress=False)
    assert "resuming" in capsys.readouterr().err and summary["updates"] == 40
    with pytest.raises(UserError, match=r"other settings \(size 'multitask' then, '25%' now; "
                                        r"network\.trunk\.width 1\.9"):
        train_student(config(data, updates=50, eval_every=0, size="25%"), run, wandb_mode="off", show_progress=False)


@pytest.mark.slow
def test_sweep_runs_the_grid_and_writes_its_table(data, tmp_path, monkeypatch, run_cli):
    _, paths, teachers = data
    monkeypatch.chdir(tmp_path)
    base = tmp_path / "base.toml"
    base.write_text("updates = 15\nbatch_size = 16\neval_every = 0\neval_episodes = 1\nfinal_eval_episodes = 2\n"
                    "loader_workers = 0\neval_workers = 1\noptimizer = 'adam'\nlr = 1e-3\nnum_threads = 1\n")
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(f"name = 'tiny'\nbase = '{base}'\ngames = {json.dumps(list(GAMES))}\n"
                     f"losses = ['kl', 'mse']\n")
    # per-game dataset and teacher paths go in as overrides (one game per run)
    for game, path, teacher in zip(GAMES, paths, teachers):
        target = tmp_path / "datasets" / "minatar" / f"{game.split('/')[1]}.h5"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(path)
        t = tmp_path / "teachers" / "minatar" / f"{game.split('/')[1]}.pt"
        t.parent.mkdir(parents=True, exist_ok=True)
        t.symlink_to(teacher)
    code, out, err = run_cli("student", "sweep", sweep, "--wandb", "off", "--no-progress")
    assert code == 0, err
    table = (tmp_path / "results" / "tiny.md").read_text()
    assert "| minatar/Breakout |" in table and "| minatar/Freeway |" in table
    assert "kl: score (% of teacher)" in table and "mse: score (% of teacher)" in table
    assert "geometric mean" in table
    assert len(json.loads((tmp_path / "results" / "tiny.json").read_text())) == 4
    code, _, err = run_cli("student", "sweep", sweep, "--wandb", "off", "--no-progress")  # all done: skipped
    assert code == 0 and err.count("(done)") == 4
    # a finished run of another config under the same name is refused, never mixed in
    code, _, err = run_cli("student", "sweep", sweep, "--wandb", "off", "--no-progress", "overrides=['lr=0.5']")
    assert code == 2 and "is finished with another config (lr: 0.001 there, 0.5 here)" in err
    assert len(json.loads((tmp_path / "results" / "tiny.json").read_text())) == 4


def test_run_names_carry_a_non_uniform_trunk_shape():
    from multitask.training.student import StudentConfig

    base = dict(games=("minatar/Seaquest",), size="7%")
    assert StudentConfig(**base, shape="uniform").run_name == "minatar-Seaquest-kl-7pct-s0"
    assert StudentConfig(**base, shape="strided").run_name == "minatar-Seaquest-kl-7pct-strided-s0"
    assert StudentConfig(**base, shape="strided", conv_width=1.0, seed=2).run_name == \
        "minatar-Seaquest-kl-7pct-strided-conv1-s2"
    base["shape"] = "uniform"
    assert StudentConfig(**base, tau=0.1).run_name == "minatar-Seaquest-kl-tau0.1-7pct-s0"
    assert StudentConfig(**base, loss="nll", tau=0.1).run_name == "minatar-Seaquest-nll-7pct-s0"  # tau unused
    assert StudentConfig(**base, tau=0.1, loss_norm=True).run_name == "minatar-Seaquest-kl-tau0.1-norm-7pct-s0"
    assert StudentConfig(**{**base, "shape": "strided"}, conv_width=1.0, tag="20k").run_name == \
        "minatar-Seaquest-kl-7pct-strided-conv1-20k-s0"


def test_the_size_preset_picks_the_trunk_shape_and_configs_hold_the_shape_built():
    from multitask.training.student import StudentConfig

    small = StudentConfig(games=("minatar/Seaquest",), size="4%")
    assert (small.shape, small.conv_width) == ("strided", 1.0)
    assert small.run_name == "minatar-Seaquest-kl-4pct-strided-conv1-s0"
    from multitask import config as configlib
    assert configlib.to_dict(small)["shape"] == "strided"
    assert (StudentConfig(games=("minatar/Seaquest",), size="7%", conv_width=0.5).conv_width) == 0.5  # given: kept
    for size, games in (("25%", ("minatar/Seaquest",)), ("100%", ("minatar/Seaquest",)), ("25%", ("atari/Pong",))):
        cfg = StudentConfig(games=games, size=size)
        assert (cfg.shape, cfg.conv_width) == ("uniform", 0.0), (size, games)
    atari_small = StudentConfig(games=("atari/Pong",), size="4%")
    assert (atari_small.shape, atari_small.conv_width) == ("flat", 0.5)  # paper A's conv 16/16/16
    assert atari_small.run_name == "atari-Pong-kl-4pct-flat-conv0.5-s0"
    assert StudentConfig(games=("minatar/Seaquest",), size="7%", shape="uniform").shape == "uniform"


def test_a_sweep_varies_one_of_losses_sizes_and_taus():
    from multitask.training.sweep import SweepConfig

    SweepConfig(name="t", base="b.toml", games=("minatar/Breakout",), taus=(1.0, 0.1), sizes=("7%",))
    with pytest.raises(ValueError, match="vary one of losses, sizes and taus"):
        SweepConfig(name="t", base="b.toml", games=("minatar/Breakout",), taus=(1.0, 0.1), sizes=("7%", "4%"))


def test_sweep_cells_cross_the_grid_and_take_datasets_from_a_folder():
    from multitask.training.sweep import SweepConfig, cell_configs

    sweep = SweepConfig(name="t", base="b.toml", games=("minatar/Breakout", "minatar/Freeway"), taus=(1.0, 0.1),
                        seeds=(0, 1), datasets_dir="datasets/agg", overrides=("tag=agg",))
    cells = cell_configs(sweep, {"updates": 7})
    assert [(c.games[0], c.tau, c.seed) for c in cells[:4]] == [
        ("minatar/Breakout", 1.0, 0), ("minatar/Breakout", 1.0, 1), ("minatar/Breakout", 0.1, 0),
        ("minatar/Breakout", 0.1, 1)]
    assert [c.datasets for c in cells[::4]] == [("datasets/agg/Breakout.h5",), ("datasets/agg/Freeway.h5",)]
    assert {c.updates for c in cells} == {7} and cells[0].run_name == "minatar-Breakout-kl-tau1-100pct-agg-s0"
    assert cell_configs(SweepConfig(name="t", base="b.toml", games=("minatar/Breakout",)), {})[0].datasets == ()


@pytest.mark.parametrize("fields, words", [
    (dict(seeds=(0, 0)), "two runs named minatar-Breakout-kl-100pct-s0 (a value listed twice)"),
    (dict(games=("minatar/Breakout", "minatar/Breakout")), "(a value listed twice)"),
    (dict(losses=("nll",), taus=(0.1, 0.01)), "two runs named minatar-Breakout-nll-100pct-s0 that differ in tau"),
    (dict(losses=("kl", "nll"), overrides=("name=fixed",)), "two runs named fixed that differ in loss"),
    (dict(losses=()), "has no runs"),
])
def test_sweep_cells_that_share_a_run_folder_or_make_no_run_are_refused_before_training(fields, words):
    """A seed listed twice was one run counted as two seeds in the table; taus crossed with nll, or a
    `name` override, trained the first cell and then stopped at the second ("finished with another
    config"); no losses wrote an empty table with exit 0."""
    from multitask.training.sweep import SweepConfig, cell_configs

    sweep = SweepConfig(name="t", base="b.toml", **{"games": ("minatar/Breakout",), **fields})
    with pytest.raises(UserError, match=r"^[^\n]+$") as e:
        cell_configs(sweep, {})
    assert words in str(e.value)


def test_a_student_distils_in_bf16_channels_last(data, tmp_path):
    summary = train_student(config(data, updates=20, eval_every=0, precision="bf16", channels_last=True),
                            run_dir=tmp_path / "bf16", wandb_mode="off", show_progress=False)
    assert summary["config"]["precision"] == "bf16" and summary["config"]["channels_last"] is True
    losses = [json.loads(x) for x in (tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()]
    values = [v for x in losses for k, v in x.items() if k.endswith("/loss")]
    assert values and np.isfinite(values).all()
    assert load_agent(tmp_path / "bf16" / "last.pt").net.trunk.convs[0].weight.dtype == torch.float32


def test_a_dataset_still_being_built_is_refused(data, tmp_path):
    """An interrupted build opens and verifies (its episodes so far), but is a prefix of what was
    asked for: training on it is refused, with the command that finishes it."""
    import shutil

    from multitask.training.student import resolve_inputs

    _, paths, _ = data
    partial = tmp_path / "Breakout.h5"
    shutil.copy(paths[0], partial)
    with h5py.File(partial, "r+") as f:
        f.attrs["status"], f.attrs["target_steps"] = "building", 10_000
    with pytest.raises(UserError, match=r"still being built \(3,000 of 10,000 steps\); finish it with .*--resume"):
        resolve_inputs(config(data, datasets=(str(partial), paths[1])))
    assert resolve_inputs(config(data)).datasets == [Path(p) for p in paths]


def test_a_run_is_not_resumed_on_a_rebuilt_dataset_and_its_summary_names_its_datasets(data, tmp_path):
    """A dataset rebuilt (or extended by `dataset build --resume`) under the same path is other data:
    the run resumed silently onto it, and nothing in summary.json said which data a student learnt."""
    import shutil

    own = tmp_path / "Breakout.h5"
    shutil.copy(data[1][0], own)
    small = dict(updates=12, games=GAMES[:1], datasets=(str(own),), teachers=(data[2][0],), eval_every=0,
                 checkpoint_every=6, final_eval_episodes=1, batch_size=16)
    summary = train_student(config(data, **small), tmp_path / "run", wandb_mode="off", show_progress=False)
    with h5py.File(own, "r") as f:
        created, steps = f.attrs["created"], int(f.attrs["num_steps"])
    assert summary["datasets"] == {"minatar/Breakout": {"path": str(own), "created": created, "steps": steps,
                                                        "episodes": summary["datasets"]["minatar/Breakout"]["episodes"]}}
    with h5py.File(own, "r+") as f:
        f.attrs["created"] = "2099-01-01T00:00:00Z"  # what a rebuild changes
    with pytest.raises(UserError, match=r"datasets\.minatar/Breakout\.created"):
        train_student(config(data, **{**small, "updates": 24}), tmp_path / "run", wandb_mode="off",
                      show_progress=False)


def test_each_head_is_distilled_towards_its_own_games_teacher_rows(tmp_path):
    """A mixed batch of two games with the same action count: each game's loss is its own head's
    output against its own teacher rows (a mix-up raises nothing, since the shapes agree)."""
    from multitask.data.loader import TrainBatch
    from multitask.training.losses import distillation_loss
    from multitask.training.student import Inputs, Student

    games = [get_game("minatar/Breakout"), get_game("minatar/Freeway")]  # 3 actions each
    cfg = StudentConfig(games=tuple(g.name for g in games), size="custom", width=0.25, loss="kl", tau=0.1,
                        device="cpu")
    spec, size = sized_network(cfg.size, games, cfg.width, cfg.extra_fc)
    student = Student(spec, cfg, Inputs(games, [], [tmp_path / "none.pt"] * 2), size.counts("student"),
                      torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    obs = torch.randint(0, 2, (8, spec.trunk.in_channels, 10, 10), generator=gen, dtype=torch.uint8)
    teacher = (torch.randn(4, 3, generator=gen) * 3, torch.randn(4, 3, generator=gen) * 3)
    groups = ((0, 0, 4), (1, 4, 8))
    with torch.no_grad():
        outputs = student.net(obs, groups=[(g, slice(a, b)) for g, a, b in groups])
        expected = [distillation_loss("kl", out, q, 0.1).item() for out, q in zip(outputs, teacher)]
    losses = student.learn(student.net, TrainBatch(obs, groups, teacher, 0))
    assert [g for g, _ in losses] == ["minatar/Breakout", "minatar/Freeway"]
    assert [l.item() for _, l in losses] == pytest.approx(expected, rel=1e-5)
    assert abs(expected[0] - expected[1]) > 1e-3  # the check can tell the two games apart
