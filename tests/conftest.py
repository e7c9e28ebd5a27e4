"""Fixtures shared by the test modules."""

import os
from pathlib import Path

# The suite is the CPU suite, on a GPU machine too: its bit-exact expectations (a resumed run's
# weights, stored teacher outputs against a CPU recomputation) hold on one device, and cuDNN's
# backward passes are not deterministic. Set before torch first looks for a GPU; subprocesses
# inherit it. MULTITASK_TEST_GPU=1 leaves the GPUs visible (device=auto then picks one).
if os.environ.get("MULTITASK_TEST_GPU") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import pytest  # noqa: E402
import torch  # noqa: E402

from multitask.agents.checkpoints import save_agent
from multitask.agents.networks import MultiHeadNet, teacher_network_spec
from multitask.envs import get_game

os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(1)  # tests run on 2 cores beside other tests' emulators


@pytest.fixture
def run_cli(capsys):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    from multitask.cli import main

    def run(*args):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse usage errors exit like a real process would
            code = e.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


def _make_teacher(path: Path, game: str, seed: int = 0, nan: bool = False, actions: int | None = None,
                  eval_mean: float | None = None) -> Path:
    """A real (randomly initialised) teacher checkpoint; what it plays like does not matter here."""
    torch.manual_seed(seed)
    spec = teacher_network_spec(get_game(game))
    if actions is not None:
        spec = spec.__class__(spec.trunk, spec.games, (actions,))
    net = MultiHeadNet(spec)
    if nan:
        with torch.no_grad():
            net.heads[0].bias.fill_(float("nan"))
    card = {"source": "test"} if eval_mean is None else {"source": "test", "eval": {"mean": eval_mean}}
    save_agent(path, net, "teacher", card)
    return path


@pytest.fixture(scope="session")
def make_teacher():
    """make_teacher(path, game, seed=0, nan=False, actions=None, eval_mean=None) -> path of a real checkpoint."""
    return _make_teacher
