import os

import pytest
import torch

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
