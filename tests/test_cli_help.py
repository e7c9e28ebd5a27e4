"""Every command and subcommand answers --help in a real process, without a traceback."""

import argparse
import subprocess
import sys

import pytest

from multitask.cli import build_parser


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path of the parser: (), ("dataset",), ("dataset", "build"), ..."""
    found = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _commands(sub, (*prefix, name))
    return found


COMMANDS = _commands(build_parser())


def test_the_command_tree_is_found():
    assert ("dataset", "build") in COMMANDS and ("student", "train") in COMMANDS and () in COMMANDS


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "multitask")
def test_help_works_in_a_process(command):
    done = subprocess.run([sys.executable, "-m", "multitask", *command, "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout.startswith("usage: multitask")
