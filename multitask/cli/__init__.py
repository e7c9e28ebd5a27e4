"""The `multitask` command: one subcommand per stage of the pipeline, one module per stage.

Each module adds its subcommands to the parser (`add_commands`) and holds their thin `cmd_*`
functions: parse, call the library, print. Every user mistake surfaces as a `UserError`, printed
as one sentence with exit code 2 and no traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from multitask import __version__
from multitask.cli import baseline, catalog, compare, dataset, evaluation, gridworld, pipeline, student, teacher
from multitask.errors import UserError

STAGES = (catalog, teacher, dataset, student, baseline, evaluation, compare, pipeline, gridworld)  # in pipeline order, as `--help` lists them


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="multitask", description="Multi-task policy distillation: "
                                "teachers, datasets, students, evaluation.")
    p.add_argument("--version", action="version", version=f"multitask {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for stage in STAGES:
        stage.add_commands(sub)
    return p


def _command_parser(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
    """The (sub)parser of the command `argv` names: `teacher train ...` -> the `teacher train` parser."""
    for word in argv:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or word not in subs[0].choices:
            break
        parser = subs[0].choices[word]
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come after flags (`train G --config c.toml lr=1e-3 --no-progress`); argparse
    # stops filling a nargs="*" positional at the first flag, so leftover key=value words join it.
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:  # with the usage of the command they were given to, not the top level's
        _command_parser(parser, sys.argv[1:] if argv is None else argv).error(
            f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        if getattr(args, "wandb", None) == "online":  # refused before a run folder is written
            from multitask.training.tracking import check_wandb

            check_wandb("online")
        if getattr(args, "executor", None) == "slurm":  # refused before any work
            from multitask.jobs import check_executor

            check_executor("slurm")
        args.func(args)
    except UserError as e:
        print(f"multitask: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("multitask: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`multitask config student | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's exit flush must not fail again
        return 141  # 128 + SIGPIPE, as a shell reports it
    return 0
