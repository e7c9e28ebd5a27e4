"""A user's mistake ends in one sentence on stderr and exit code 2, no traceback, nothing written:
text files passed as checkpoints, `--wandb online` without credentials, `--executor slurm` off a
cluster, non-UTF-8 or directory `--config`, multi-player-only Atari ROMs, run folders to evaluate."""

import random
import subprocess
from pathlib import Path
import sys

import pytest

from multitask.agents.checkpoints import NotTorchFile, torch_load
from multitask.errors import UserError

NOT_CHECKPOINTS = {  # name: contents (hello: KeyError in the pickle reader, csv: IndexError)
    "hello.pt": b"hello\n", "config.pt": b"# a preset\ntotal_steps = 1_000\n\n[dqn]\nlr = 1e-4\n",
    "table.pt": b"a,b\n1,2\n", "empty.pt": b"",
    "lfs.pt": b"version https://git-lfs.github.com/spec/v1\noid sha256:ab12\nsize 123\n",
}


def _one_sentence(code, err, *needles):
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("multitask: error: ") and all(n in err for n in needles), err


@pytest.mark.parametrize("name", NOT_CHECKPOINTS)
def test_a_file_that_is_not_a_checkpoint_is_one_sentence(tmp_path, run_cli, name):
    path = tmp_path / name
    path.write_bytes(NOT_CHECKPOINTS[name])
    _one_sentence(*run_cli("evaluate", path, "--episodes", "1")[::2], name, "not a multitask checkpoint")
    out = tmp_path / "imported.pt"
    _one_sentence(*run_cli("teacher", "import", "cleanrl", path, "--game", "atari/Pong", "--out", out)[::2],
                  name, "not a PyTorch checkpoint")
    _one_sentence(*run_cli("compare", path, "--out", tmp_path / "cmp", "--episodes", "2")[::2], name)
    assert not out.exists() and not (tmp_path / "cmp").exists()  # no empty report folder either


def test_torch_load_of_any_bytes_fails_only_as_not_a_torch_file():
    """The pickle reader raises KeyError, IndexError, UnicodeDecodeError, ... on arbitrary bytes."""
    rng = random.Random(0)
    for _ in range(200):
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
        try:
            torch_load(data)
        except NotTorchFile as e:
            assert "\n" not in e.why and "Please file an issue" not in e.why and len(e.why) <= 160
    with pytest.raises(NotTorchFile, match="Unsupported operand"):  # torch's boilerplate dropped
        torch_load(b"\x80\x02[junk")


def test_wandb_online_without_credentials_writes_nothing(tmp_path, run_cli, monkeypatch):
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "NETRC", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc
    run = tmp_path / "run"
    code, _, err = run_cli("teacher", "train", "minatar/Breakout", "--run-dir", run, "--wandb", "online",
                           "total_steps=1000")
    _one_sentence(code, err, "wandb login", "WANDB_API_KEY", "--wandb offline")
    assert not run.exists()


def test_tracker_turns_wandb_usage_error_into_one_sentence(tmp_path, monkeypatch):
    """Where the credential check cannot run (another wandb), wandb.init's own refusal is caught."""
    from multitask.training import tracking

    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "NETRC", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(tracking, "check_wandb", lambda mode: None)
    with pytest.raises(UserError, match="wandb login"):
        tracking.Tracker("online", tmp_path / "run", name="t", config={}, job_type="test")


def test_slurm_executor_off_a_cluster(tmp_path, run_cli, monkeypatch, make_teacher):
    from multitask.jobs import run_jobs

    teacher = make_teacher(tmp_path / "t.pt", "minatar/Breakout")
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, no srun
    _one_sentence(*run_cli("evaluate", teacher, "--executor", "slurm", "--jobs-dir", tmp_path / "jobs")[::2],
                  "Slurm cluster", "processes")
    _one_sentence(*run_cli("dataset", "build", "minatar/Breakout", "--teacher", teacher, "--executor", "slurm",
                           "--out", tmp_path / "ds", "--steps", "10")[::2], "sbatch")
    with pytest.raises(UserError, match="needs a Slurm cluster"):
        run_jobs(print, [1], ["a"], executor="slurm", folder=tmp_path / "jobs")
    assert not (tmp_path / "jobs").exists() and not (tmp_path / "ds").exists()


def test_config_that_is_not_utf8_or_is_a_directory(tmp_path, run_cli):
    latin = tmp_path / "latin.toml"
    latin.write_bytes("total_steps = 1 # caf\xe9\n".encode("latin-1"))
    run = tmp_path / "run"
    _one_sentence(*run_cli("teacher", "train", "minatar/Breakout", "--config", latin, "--run-dir", run)[::2],
                  "latin.toml", "UTF-8")
    _one_sentence(*run_cli("teacher", "train", "minatar/Breakout", "--config", tmp_path, "--run-dir", run)[::2],
                  "is a directory, not a TOML file")
    assert not run.exists()


@pytest.mark.parametrize("game", ["Combat", "Joust", "MazeCraze", "Warlords"])
def test_multiplayer_only_atari_roms_are_refused_not_listed(tmp_path, run_cli, game):
    from multitask.envs import known_games

    assert f"atari/{game}" not in known_games("atari")
    _one_sentence(*run_cli("teacher", "train", f"atari/{game}", "--run-dir", tmp_path / "r")[::2],
                  f"atari/{game} cannot be played", "multi-player")


@pytest.mark.slow
def test_games_actions_loads_every_listed_rom():
    """ALE exits the whole process on a ROM it cannot wrap, so only a subprocess can show it."""
    p = subprocess.run([sys.executable, "-m", "multitask", "games", "--suite", "atari", "--actions"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "Attempt to wrap ROM" not in p.stderr, p.stderr[-500:]
    assert "atari/Pong" in p.stdout and "atari/Joust" not in p.stdout


def test_evaluate_takes_a_run_folder_like_compare(tmp_path, run_cli, make_teacher):
    run = tmp_path / "run"
    run.mkdir()
    make_teacher(run / "best.pt", "minatar/Breakout")
    code, out, err = run_cli("evaluate", run, "--episodes", "1", "--no-progress")
    assert code == 0 and "minatar/Breakout" in out and str(run / "best.pt") in out, err
    (tmp_path / "empty").mkdir()
    _one_sentence(*run_cli("evaluate", tmp_path / "empty")[::2], "has no best.pt")


def test_a_teacher_listed_for_another_game_is_refused_before_training(tmp_path, run_cli, make_teacher):
    """Swapped `teachers` used to train to the end and fail at the final evaluation, leaving a run
    without its summary; every trainer now checks them before its first update."""
    breakout = make_teacher(tmp_path / "Breakout.pt", "minatar/Breakout")
    freeway = make_teacher(tmp_path / "Freeway.pt", "minatar/Freeway")
    swapped = f"teachers={freeway},{breakout}"
    for args in (("baseline", "train", "games=minatar/Breakout,minatar/Freeway", swapped, "total_steps_per_game=64"),
                 ("student", "drive", "games=minatar/Breakout,minatar/Freeway", swapped, "total_steps_per_game=64")):
        run_dir = tmp_path / args[0]
        code, _, err = run_cli(*args, "--run-dir", run_dir, "--wandb", "off", "--no-progress")
        _one_sentence(code, err, str(freeway), "minatar/Breakout", "plays minatar/Freeway")
        assert not (run_dir / "state.pt").exists() and not (run_dir / "best.pt").exists()


def test_a_folder_as_a_teachers_out_is_named_as_such(tmp_path, run_cli):
    source = tmp_path / "dqn_atari.cleanrl_model"
    source.write_bytes(b"unused: the --out check comes first")
    for extra in ((), ("--overwrite",)):
        code, _, err = run_cli("teacher", "import", "cleanrl", source, "--game", "atari/Pong", "--out", tmp_path, *extra)
        _one_sentence(code, err, "is a folder")


def test_a_listed_teacher_that_is_missing_is_refused(tmp_path, run_cli):
    """A path in `teachers` that is not there used to be dropped in silence by the student and the
    multi-task DQN (the run trained and reported no % of teacher); only the default path may be missing."""
    missing = tmp_path / "nowhere" / "Breakout.pt"
    for args in (("student", "train", "--config", Path(__file__).parents[1] / "configs/student/minatar_single.toml", "updates=10"),
                 ("baseline", "train", "total_steps_per_game=64"),
                 ("student", "drive", "total_steps_per_game=64")):
        run_dir = tmp_path / args[1]
        code, _, err = run_cli(*args, "games=minatar/Breakout", f"teachers={missing}", "--run-dir", run_dir,
                               "--wandb", "off", "--no-progress")
        _one_sentence(code, err, str(missing), "which `teachers` lists")
        assert not run_dir.exists()
