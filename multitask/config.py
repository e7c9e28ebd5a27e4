"""Typed configs: dataclasses loaded from TOML, overridden from the command line, saved with runs.

A config is a (possibly nested) dataclass whose fields are declared with `option(default, doc)`;
the doc is one line that says what the field does and where its default comes from. Values are
layered once, at construction: dataclass defaults <- TOML file <- `key=value` overrides
(`section.key=value` for nested tables). Unknown keys and ill-typed values are user errors that
name the key. Nothing mutates a config after it is built.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar, get_args, get_origin

from multitask.errors import UserError

T = TypeVar("T")


_ABSENT = object()


def option(default: Any, doc: str, absent: Any = _ABSENT) -> Any:
    """A config field with a default and a one-line doc (what it does; source of the default).
    `absent`: the value runs saved before the key existed were built with, where that is not the
    default (a default that changed meaning); `saved_config` fills it in."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use tuples for sequence defaults so that configs stay immutable")
    metadata = {"doc": doc} if absent is _ABSENT else {"doc": doc, "absent": absent}
    if dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: default, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def saved_config(cls: type, saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config with the `absent` value of each key it lacks that has one: what a run saved
    before that key existed was built with."""
    filled = dict(saved)
    for f in dataclasses.fields(cls):
        if f.name not in filled and "absent" in f.metadata:
            filled[f.name] = f.metadata["absent"]
    return filled


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp`, converting where lossless (int -> float)."""
    origin = get_origin(tp)
    bad = UserError(f"config key '{key}' in {source} must be {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            raise UserError(f"config key '{key}' in {source} must be one of "
                            f"{', '.join(map(repr, get_args(tp)))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except UserError:
                pass
        raise bad
    if origin in (tuple, list):
        args = get_args(tp)
        item_tp = args[0] if args else Any
        if isinstance(value, str):  # a,b,c on the command line: each item read as an override's value,
            # except in a list of strings, whose items are taken as written (`--num-envs,8`)
            value = [v.strip() if item_tp is str else parse_value(v.strip()) for v in value.split(",") if v.strip()]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]  # actions=4 on the command line: a list of one
        if not isinstance(value, (list, tuple)):
            raise bad
        return tuple(_coerce(v, item_tp, key, source) for v in value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():  # 1e6 written in TOML
            return int(value)
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return _build(tp, value, source, prefix=key + ".")
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(map(repr, get_args(tp)))
    if get_origin(tp) in (tuple, list):
        return "a list"
    return getattr(tp, "__name__", str(tp))


def _build(cls: type[T], data: dict[str, Any], source: str, prefix: str = "") -> T:
    hints = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise UserError(f"unknown config key '{prefix}{unknown[0]}' in {source}; known keys: "
                        f"{', '.join(prefix + n for n in names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):  # a table: its keys over the field's own default
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
            given = data.get(f.name, {})
            if not isinstance(given, dict):
                raise UserError(f"config key '{prefix}{f.name}' in {source} must be a table, got {given!r}")
            table = _merged(dataclasses.asdict(default), given) if default is not None else given
            kwargs[f.name] = _build(hints[f.name], table, source, prefix + f.name + ".")
        elif f.name in data:
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], prefix + f.name, source)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:  # __post_init__ validation, named with its table ([grid] size ...)
        table = f" [{prefix[:-1]}]" if prefix else ""
        raise UserError(f"invalid config from {source}{table}: {e}") from None


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` deep-merged onto `base` (tables merged key by key), neither changed."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise UserError(f"override '{text}' must look like key=value (e.g. lr=3e-4)")
    key, raw = text.split("=", 1)
    return key.strip().split("."), parse_value(raw)


def read_value(raw: str, tp: Any, key: str, source: str) -> Any:
    """A command-line word as config key `key` of type `tp` takes it (what an override does)."""
    return _coerce(parse_value(raw), tp, key, source)


def parse_value(raw: str) -> Any:
    """An override's value as TOML reads it (3e-4, true, [1, 2]), or the bare string: game names
    and paths need no quotes on the command line."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _merge(base: dict[str, Any], path: list[str], value: Any) -> None:
    node = base
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"override '{'.'.join(path)}' goes inside '{part}', which is not a table")
    node[path[-1]] = value


def read_toml(path: Path) -> dict[str, Any]:
    """A TOML file's tables; a missing path, a directory, an unreadable or non-UTF-8 file (TOML is
    UTF-8 by definition) or bad syntax is one sentence naming the file."""
    if path.is_dir():
        raise UserError(f"config file {path} is a directory, not a TOML file; pass a .toml file "
                        f"(configs/ holds the presets)")
    if not path.is_file():
        raise UserError(f"config file {path} does not exist; pass an existing TOML file")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"config file {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                        f"{e.start}), so not a TOML file; pass a TOML file saved as UTF-8") from None
    except OSError as e:
        raise UserError(f"config file {path} cannot be read ({e.strerror or e}); check its "
                        f"permissions") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"config file {path} is not valid TOML ({e}); fix the syntax") from None


def load(cls: type[T], path: Path | None = None, overrides: Sequence[str] = (),
         data: dict[str, Any] | None = None) -> T:
    """Build `cls` from defaults, then `data` or the TOML at `path`, then `key=value` overrides."""
    merged: dict[str, Any] = dict(data or {})
    if path is not None:
        merged = read_toml(Path(path))
    source = str(path) if path is not None else "the command line"
    if overrides:
        names = {f.name for f in dataclasses.fields(cls)}
        for text in overrides:
            keys, value = _parse_override(text)
            if keys[0] not in names:
                raise UserError(f"unknown config key '{keys[0]}' on the command line; known keys: "
                                f"{', '.join(sorted(names))}")
            _merge(merged, keys, value)
    return _build(cls, merged, source if not overrides else f"{source} and overrides")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain dict (tuples become lists) suitable for JSON, TOML and W&B."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(cls: type[T], data: dict[str, Any], source: str = "a saved config") -> T:
    return _build(cls, data, source)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if v is None:
        raise ValueError("TOML has no null")
    raise TypeError(f"cannot write {type(v)} to TOML")


def to_toml(cfg: Any) -> str:
    """Write a config (nested dataclasses -> tables) as TOML; None values are left out."""
    lines: list[str] = []
    tables: list[tuple[str, dict]] = []

    def emit(d: dict[str, Any], prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                tables.append((prefix + k, v))
            elif v is not None:
                lines.append(f"{k} = {_toml_value(v)}")

    emit(to_dict(cfg), "")
    while tables:
        name, d = tables.pop(0)
        lines.append(f"\n[{name}]")
        emit(d, name + ".")
    return "\n".join(lines) + "\n"


def command_line() -> str:
    """The command that is running, as a user would type it (`multitask ...`), for provenance."""
    import sys

    return as_typed(" ".join(sys.argv))


def as_typed(command: str) -> str:
    """A recorded command as a user types it: the program's path dropped (`/tmp/venv/bin/multitask
    teacher train G` or `.../__main__.py ...` -> `multitask teacher train G`), so provenance does not
    carry one machine's virtualenv."""
    prog, _, args = command.partition(" ")
    name = Path(prog).name
    if name == "__main__.py" or name.startswith("multitask"):
        name = "multitask"
    return f"{name} {args}".strip()


def describe(cls: type, defaults: Any = None) -> list[tuple[str, str, Any, str]]:
    """(key, type, default, doc) for every field, nested tables flattened with dots after a row of
    type "table" with the table's own doc. A nested table's defaults are its field's default (a
    study's [counter_train] is not TabularConfig()'s defaults), read from `defaults` when given."""
    hints = _field_types(cls)
    rows = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if defaults is not None:
            default = getattr(defaults, f.name)
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if dataclasses.is_dataclass(tp):
            rows.append((f.name, "table", None, f.metadata.get("doc", "")))
            rows += [(f"{f.name}.{k}", t, d, doc) for k, t, d, doc in describe(tp, default)]
            continue
        rows.append((f.name, _type_name(tp), default, f.metadata.get("doc", "")))
    return rows


# The config dataclass of each command family, imported when asked for (this module is below them all).
CONFIG_CLASSES = {"teacher": "multitask.training.teacher:TeacherConfig",
                  "dataset": "multitask.data.build_config:DatasetConfig",
                  "student": "multitask.training.student:StudentConfig",
                  "baseline": "multitask.training.baseline:BaselineConfig",
                  "driven": "multitask.training.driven:DrivenConfig",
                  "sweep": "multitask.training.sweep:SweepConfig",
                  "gridworld": "multitask.training.gridworld_studies:StudyConfig",
                  "pipeline": "multitask.pipeline:PipelineConfig"}


def config_class(what: str) -> type:
    """The config dataclass of a command family (`multitask config <what>`; run folders are matched
    to theirs by `evaluation/entrants`)."""
    if what not in CONFIG_CLASSES:
        raise UserError(f"no config named {what}")
    module, name = CONFIG_CLASSES[what].split(":")
    return getattr(importlib.import_module(module), name)
