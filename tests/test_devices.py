"""Device selection: every trainer's `device` key, refusals in one sentence, and the config as built;
how updates run there: bf16 autocast and channels-last layout, on the CPU (the same code paths as a GPU's)."""

import copy

import pytest
import torch

from multitask.agents.checkpoints import load_agent
from multitask.agents.dqn import DQNConfig, DQNLearner
from multitask.agents.networks import MultiHeadNet, NetworkSpec, TrunkSpec
from multitask.agents.replay import ReplayBatch
from multitask.errors import UserError
from multitask.devices import arrange, autocast, pick_device
from multitask.training.distributed import start_processes


def test_device_names():
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True  # torch's GPU defaults
    assert pick_device("cpu") == torch.device("cpu")
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32  # fp32 is fp32
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
    assert f'device = "{pick_device("auto").type if "device=auto" in args else "cpu"}"' in (run / "config.toml").read_text()


def _learner_pair(**dqn):
    torch.manual_seed(0)
    net = MultiHeadNet(NetworkSpec(TrunkSpec("minatar", 4, 10), ("a", "b"), (3, 5)))
    cfg = DQNConfig(lr=1e-3, batch_size=16, **dqn)
    obs = torch.randint(0, 2, (16, 4, 10, 10), dtype=torch.uint8)
    batch = ReplayBatch(obs, torch.randint(0, 3, (16,)), torch.linspace(-1, 1, 16), torch.zeros(16), obs.flip(0))
    return net, cfg, batch


def test_bf16_updates_run_under_autocast_and_keep_fp32_weights_and_losses():
    net, cfg, batch = _learner_pair()
    fp32, bf16 = DQNLearner(copy.deepcopy(net), cfg), DQNLearner(copy.deepcopy(net), cfg, precision="bf16")
    plain = DQNLearner(copy.deepcopy(net), cfg)
    groups = [(0, slice(0, 8)), (1, slice(8, 16))]
    a, b, c = (x.update_grouped(batch, groups) for x in (fp32, bf16, plain))
    assert a == c  # fp32 runs no autocast context: exactly the plain path, run to run
    assert a["loss"] != b["loss"] and b["loss"] == pytest.approx(a["loss"], rel=0.05)  # bf16 rounding, not another loss
    assert all(p.dtype == torch.float32 for p in bf16.net.parameters())
    with autocast(torch.device("cpu"), "bf16"):
        assert bf16.net(batch.obs).dtype == torch.bfloat16  # the context is really bf16 autocast
    with autocast(torch.device("cpu"), "fp32"):
        assert bf16.net(batch.obs).dtype == torch.float32


def test_channels_last_changes_the_layout_not_the_values_or_the_checkpoint(tmp_path):
    net, cfg, batch = _learner_pair()
    nhwc = arrange(copy.deepcopy(net), channels_last=True)
    conv = nhwc.trunk.convs[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert arrange(net, channels_last=False) is net
    assert torch.allclose(nhwc(batch.obs, 1), net(batch.obs, 1), atol=1e-6)
    plain = MultiHeadNet(net.spec)
    plain.load_state_dict(nhwc.state_dict())  # a checkpoint saved from either layout loads into the other
    assert all(torch.equal(p, q) for p, q in zip(plain.parameters(), nhwc.parameters()))


def test_a_teacher_trains_in_bf16_channels_last_and_its_config_says_so(tmp_path, run_cli):
    run = tmp_path / "run"
    code, _, err = run_cli("teacher", "train", "minatar/Breakout", "total_steps=96", "learning_starts=32",
                           "eval_every=0", "replay_capacity=256", "final_eval_episodes=1", "device=cpu",
                           "precision=bf16", "channels_last=true", "--out", tmp_path / "T.pt", "--run-dir", run,
                           "--wandb", "off", "--no-progress")
    assert code == 0, err
    saved = (run / "config.toml").read_text()
    assert 'precision = "bf16"' in saved and "channels_last = true" in saved
    agent = load_agent(tmp_path / "T.pt")
    assert agent.net.trunk.convs[0].weight.dtype == torch.float32
    code, _, err = run_cli("teacher", "train", "minatar/Breakout", "total_steps=96", "learning_starts=32",
                           "eval_every=0", "replay_capacity=256", "final_eval_episodes=1", "precision=fp16",
                           "--out", tmp_path / "U.pt", "--run-dir", tmp_path / "run2", "--wandb", "off", "--no-progress")
    assert code == 2 and "precision" in err and not (tmp_path / "U.pt").exists()
