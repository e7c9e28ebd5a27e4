"""The columns of a comparison: which agents, on which games, and which seeds are pooled.

An input is an agent checkpoint (`*.pt`) or a run folder (its best.pt; its metrics.jsonl gives the
learning curve). Run folders whose saved configs (config.toml) are equal except for the seed, the
name and settings that change how fast a run goes but not what it learns (`EXECUTION_KEYS`) are
seeds of one method: they are pooled into one column, each seed a member (rliable's runs axis; paper
tables report a method's mean over seeds). `--separate-seeds` keeps each run its own column. The
teachers are one column too: one member holding one checkpoint per game.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from multitask import config as configlib
from multitask.agents.checkpoints import Agent, check_agent_game, load_agent
from multitask.agents.networks import MultiHeadNet, NetworkSpec, TrunkSpec, teacher_network_spec
from multitask.envs import get_game
from multitask.errors import UserError

TEACHER_LABEL = "teacher"
RANDOM_LABEL = "random"
# Config keys that say how a run was executed, not what it learned: runs differing only in these
# (and in seed and name) are seeds of one method.
EXECUTION_KEYS = frozenset({"seed", "name", "eval_workers", "loader_workers", "num_threads", "device", "channels_last",
                            "memory_budget_mb", "window_batches", "checkpoint_every", "log_every"})
_SEED_SUFFIX = re.compile(r"^(.*)-s\d+$")  # training.run.default_run_name ends in -s<seed>


@dataclass
class Member:
    """One seed of a column: the checkpoint playing each game, and where it came from."""
    agents: dict[str, Agent]  # game -> the checkpoint that plays it
    source: Path | None = None  # the input as given (checkpoint or run folder)
    run_dir: Path | None = None
    seed: int | None = None  # the run's seed, from its config (None: a bare checkpoint, the teachers)


@dataclass
class Entrant:
    """One column of the comparison: one member per seed (a single input is one member)."""
    label: str
    kind: str
    members: list[Member]

    @property
    def games(self) -> list[str]:
        return list(self.members[0].agents)

    @property
    def pooled(self) -> bool:
        return len(self.members) > 1


def load_input(path: Path) -> tuple[Agent, Path | None]:
    """A checkpoint, or a run folder's best.pt (returned with the folder)."""
    path = Path(path)
    if path.is_dir():
        if not (path / "best.pt").is_file():
            raise UserError(f"run folder {path} has no best.pt; pass a finished run's folder or a checkpoint (*.pt)")
        return load_agent(path / "best.pt"), path
    return load_agent(path), None


def _label(path: Path, run_dir: Path | None) -> str:
    if run_dir is not None:
        return run_dir.name
    return f"{path.parent.name}/{path.stem}" if path.stem in ("best", "last") else path.stem


def _run_config(run_dir: Path | None, kind: str) -> dict[str, Any] | None:
    """A run folder's saved config with every key its config class has now (None for a checkpoint
    or a folder without a readable one): a run saved before a key existed (e.g. `control`) holds
    that key's default, as a resume takes it, so seeds saved by older code still pool."""
    if run_dir is None or not (run_dir / "config.toml").is_file():
        return None
    try:
        saved = configlib.read_toml(run_dir / "config.toml")
    except Exception:  # an unreadable config only means the run is not pooled
        return None
    try:
        what = "baseline" if kind == "multitask-dqn" else "driven" if "variant" in saved else "student"
        cls = configlib.config_class(what)
        return configlib.to_dict(configlib.load(cls, data=configlib.saved_config(cls, saved)))
    except Exception:  # a key removed since, or invalid now: compare the config as saved
        return saved


def method_key(kind: str, config: dict[str, Any] | None) -> str | None:
    """What identifies a method across its seeds: the kind and the config without EXECUTION_KEYS."""
    if config is None:
        return None
    return repr((kind, sorted((k, repr(v)) for k, v in config.items() if k not in EXECUTION_KEYS)))


def pooled_label(names: Sequence[str]) -> str:
    """The runs' common name without its -s<seed> suffix (`minatar-3games-kl-multitask-s0`, `...-s1`
    -> `minatar-3games-kl-multitask`), else the first name with the seed count."""
    stems = {m.group(1) if (m := _SEED_SUFFIX.match(n)) else None for n in names}
    if len(stems) == 1 and None not in stems:
        return stems.pop()
    return f"{names[0]}+{len(names) - 1}"


def resolve_entrants(inputs: Sequence[Path], pool_seeds: bool = True) -> list[Entrant]:
    """One column per input, except that seeds of one method (see module doc) share a column."""
    members: list[tuple[str, str, str | None, Member]] = []
    for path in inputs:
        agent, run_dir = load_input(path)
        config = _run_config(run_dir, agent.kind)
        seed = config.get("seed") if config else None
        member = Member({g: agent for g in agent.net.games}, Path(path), run_dir, seed if isinstance(seed, int) else None)
        key = method_key(agent.kind, config) if pool_seeds and member.seed is not None else None
        members.append((_label(Path(path), run_dir), agent.kind, key, member))
    groups: list[list[tuple[str, str, str | None, Member]]] = []
    for item in members:
        group = next((g for g in groups if item[2] is not None and g[0][2] == item[2]
                      and item[3].seed not in {m.seed for *_, m in g}), None)
        if group is None:
            groups.append([item])
        else:
            group.append(item)
    entrants: list[Entrant] = []
    for group in groups:
        base = pooled_label([name for name, *_ in group]) if len(group) > 1 else group[0][0]
        label, n = base, 2
        while label in {e.label for e in entrants} | {TEACHER_LABEL, RANDOM_LABEL}:
            label, n = f"{base}#{n}", n + 1
        entrants.append(Entrant(label, group[0][1], [m for *_, m in group]))
    return entrants


def _suite(game: str) -> str:
    return game.split("/", 1)[0]


def choose_games(entrants: Sequence[Entrant], games: Sequence[str] | None) -> list[str]:
    """The compared games (validated, one suite); each entrant keeps the games it has heads for."""
    suites = {}
    for e in entrants:
        for m in e.members:
            for g in m.agents:
                suites.setdefault(_suite(g), f"{m.source} ({g})")
    if len(suites) > 1:
        raise UserError(f"the agents mix suites ({'; '.join(suites.values())}); compare one suite at a time")
    chosen = list(dict.fromkeys(games if games else (g for e in entrants for g in e.games)))  # a game once
    specs = [get_game(g) for g in chosen]  # unknown names are a UserError listing the known games
    if len({s.suite for s in specs}) > 1:
        raise UserError(f"--games mixes suites ({', '.join(chosen)}); compare one suite at a time")
    for e in entrants:
        for m in e.members:
            playable = [g for g in m.agents if g in chosen]
            if not playable:
                raise UserError(f"{m.source} plays {', '.join(m.agents)}, none of the compared games "
                                f"({', '.join(chosen)}); drop it or name its games with --games")
            m.agents = {g: m.agents[g] for g in playable}
            for g in playable:
                check_agent_game(m.agents[g], get_game(g))
    return chosen


def resolve_teachers(games: Sequence[str], paths: Sequence[Path] | None) -> tuple[Entrant, list[str]]:
    """The teachers' column (given paths, else teachers/<suite>/<Game>.pt) and notes on missing ones
    and on given ones of games not compared (left out)."""
    agents: dict[str, Agent] = {}
    notes: list[str] = []
    if paths:
        for p in paths:
            agent = load_agent(p)
            suite = _suite(games[0])
            if len(agent.net.games) != 1 or _suite(agent.net.games[0]) != suite:
                raise UserError(f"teacher {p} plays {', '.join(agent.net.games)}, it is not a {suite} teacher "
                                f"of one game; pass one single-game teacher per compared game")
            if agent.net.games[0] in agents:
                raise UserError(f"--teachers names two teachers of {agent.net.games[0]} "
                                f"({agents[agent.net.games[0]].path} and {p}); pass one per game")
            if agent.net.games[0] in games:
                agents[agent.net.games[0]] = agent
            else:  # teachers of games not compared are left out
                notes.append(f"teacher {p} plays {agent.net.games[0]}, not a compared game "
                             f"({', '.join(games)}): left out")
    else:
        for g in games:
            p = Path("teachers") / _suite(g) / f"{g.split('/', 1)[1]}.pt"
            if p.is_file():
                agents[g] = load_agent(p)
    for g, a in agents.items():
        check_agent_game(a, get_game(g))
    notes += [f"{g} has no teacher (no --teachers file for it, no teachers/{g}.pt): no % of teacher "
              f"or teacher-normalised score for it" for g in games if g not in agents]
    return Entrant(TEACHER_LABEL, "teacher", [Member(agents)]), notes


def drop_teachers(entrants: Sequence[Entrant], teachers: Entrant) -> tuple[list[Entrant], list[str]]:
    """Inputs that are the very teacher checkpoint of their games (same sha256) are the teacher
    column already; they are left out, with a note."""
    shas = {g: a.sha256 for g, a in teachers.members[0].agents.items()}
    kept, notes = [], []
    for e in entrants:
        members = []
        for m in e.members:
            if all(shas.get(g) == a.sha256 for g, a in m.agents.items()):
                notes.append(f"{m.source} is the teacher of {', '.join(m.agents)} (same sha256): shown as the teacher")
            else:
                members.append(m)
        if members:
            e.members = members
            kept.append(e)
    if not kept:
        raise UserError("every input is a teacher of the compared games; pass a student or baseline run to compare")
    return kept, notes


def random_network(games: Sequence[str]) -> MultiHeadNet:
    """A network with a head per game; at epsilon 1.0 its outputs never choose an action."""
    specs = [get_game(g) for g in games]
    trunk = teacher_network_spec(specs[0]).trunk
    trunk = TrunkSpec(trunk.kind, max(s.obs_shape[0] for s in specs), trunk.in_size)
    return MultiHeadNet(NetworkSpec(trunk, tuple(games), tuple(s.num_actions for s in specs)))
