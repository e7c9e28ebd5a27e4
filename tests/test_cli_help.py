"""Every command and subcommand answers --help in a real process, without a traceback."""

import argparse
import json
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


@pytest.mark.parametrize("command", [(), ("dataset", "build")], ids=lambda c: " ".join(c) or "multitask")
def test_help_works_in_a_process(command):
    done = subprocess.run([sys.executable, "-m", "multitask", *command, "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout.startswith("usage: multitask")


# Every command's --help in one process (a process each cost ~2 s of imports, 30 of them a minute):
# main() as the console script calls it, stdout captured per command.
EVERY_HELP = """
import contextlib, io, json, sys
from multitask.cli import main
out = {}
for command in json.loads(sys.argv[1]):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            main([*command, "--help"])
            code = None
        except SystemExit as e:
            code = e.code
    out[" ".join(command)] = [code, buf.getvalue()[:40]]
print(json.dumps(out))
"""


def test_every_command_answers_help():
    done = subprocess.run([sys.executable, "-c", EVERY_HELP, json.dumps(COMMANDS)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    results = json.loads(done.stdout)
    assert len(results) == len(COMMANDS)
    for command, (code, text) in results.items():
        assert code in (0, None) and text.startswith("usage: multitask"), (command, code, text)


@pytest.mark.slow
def test_a_reader_that_goes_away_ends_the_command_quietly():
    # `multitask config student | head -1`: the pipe closes before the listing is written
    p = subprocess.Popen([sys.executable, "-m", "multitask", "config", "student"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141 and err == ""
