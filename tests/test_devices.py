"""Device selection: every trainer's `device` key, refusals in one sentence, and the config as built."""

import pytest
import torch

from multitask.errors import UserError
from multitask.devices import pick_device
from multitask.training.distributed import start_processes


def test_device_names():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="sees no CUDA GPU"):
            pick_device("cuda")
    assert start_processes("cpu").device == torch.device("cpu")  # a plain run: one process


def test_two_processes_per_gpu_are_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match="machine with 1 GPU"):
        start_processes("auto")


@pytest.mark.parametrize("command", ["teacher", "baseline", "driven"])
def test_the_saved_config_holds_the_device_used(command, tmp_path, run_cli, make_teacher):
    teacher = make_teacher(tmp_path / "B.pt", "minatar/Breakout", seed=1)
    run = tmp_path / "run"
    common = ["--run-dir", run, "--wandb", "off", "--no-progress"]
    if command == "teacher":
        args = ["teacher", "train", "minatar/Breakout", "total_steps=64", "learning_starts=32", "eval_every=0",
                "replay_capacity=256", "final_eval_episodes=1", "device=cpu", "--out", tmp_path / "T.pt"]
    elif command == "baseline":
        args = ["baseline", "train", "games=minatar/Breakout", f"teachers={teacher}", "size=custom", "width=0.25",
                "total_steps_per_game=64", "learning_starts=32", "replay_capacity=256", "eval_episodes=1",
                "final_eval_episodes=1", "eval_workers=1", "device=auto"]
    else:
        args = ["student", "drive", "games=minatar/Breakout", f"teachers={teacher}", "size=custom", "width=0.25",
                "num_envs=2", "rollout=8", "total_steps_per_game=32", "eval_episodes=1", "final_eval_episodes=1",
                "eval_workers=1", "device=cpu"]
    code, _, err = run_cli(*args, *common)
    assert code == 0, err
    assert 'device = "cpu"' in (run / "config.toml").read_text()
