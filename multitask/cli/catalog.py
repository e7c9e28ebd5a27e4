"""`multitask games` and `multitask config`: what the framework knows (games, config keys)."""

from __future__ import annotations

import argparse

from multitask.config import CONFIG_CLASSES


def cmd_games(args: argparse.Namespace) -> None:
    from multitask.envs import SUITES, get_game, known_games

    for suite in [args.suite] if args.suite else SUITES:
        for name in known_games(suite):
            if suite == "minatar" or args.actions:
                spec = get_game(name)
                print(f"{name:28s} {spec.num_actions:2d} actions  obs {spec.obs_shape}  "
                      f"{' '.join(spec.action_meanings) if args.actions else ''}")
            else:
                print(name)


def cmd_config(args: argparse.Namespace) -> None:
    from multitask import config as configlib

    for key, tp, default, doc in configlib.describe(configlib.config_class(args.what)):
        print(f"[{key}]{'':{40 - len(key)}s}  {doc}" if tp == "table" else f"{key:28s} {tp:10s} {default!r:>14}  {doc}")


def add_commands(sub) -> None:
    g = sub.add_parser("games", help="list the known games (<suite>/<Game>)")
    g.add_argument("--suite", choices=("atari", "minatar"))
    g.add_argument("--actions", action="store_true", help="also print each game's legal actions")
    g.set_defaults(func=cmd_games)

    c = sub.add_parser("config", help="list a config's keys, defaults and their sources")
    c.add_argument("what", choices=tuple(CONFIG_CLASSES))
    c.set_defaults(func=cmd_config)
