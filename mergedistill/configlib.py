"""Typed dataclass configs from YAML and command-line overrides, with every problem collected at once.

The config classes themselves live in `config.py`; this module is the machinery: converting nested
dicts into dataclasses (checking types, spotting unknown keys with a did-you-mean), applying
`--a.b.c=value` overrides, and reading the field docstrings that `--help` prints.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import os
import textwrap
import types
import typing
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml

from mergedistill.errors import ConfigError

MISSING = dataclasses.MISSING


@dataclasses.dataclass(frozen=True)
class Range:
    """The allowed values of a numeric config field, declared beside the field as
    `batch_size: Annotated[int, at_least(1)] = 32`; loading refuses a value outside it (naming the field
    and the range) and `--help` shows it."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    """`low` itself is not allowed."""
    high_open: bool = False
    """`high` itself is not allowed."""

    def __contains__(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (self.high is not None and (value > self.high or (self.high_open and value == self.high)))

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{_num(self.low)}, {_num(self.high)}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {_num(self.low)}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {_num(self.high)}"
        return "any value"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def at_least(low: float) -> Range:
    return Range(low=low)


def above(low: float) -> Range:
    return Range(low=low, low_open=True)


def between(low: float, high: float, exclusive: bool = False) -> Range:
    """[low, high], or (low, high) when `exclusive`."""
    return Range(low=low, high=high, low_open=exclusive, high_open=exclusive)


def field_range(tp: Any) -> Range | None:
    """The Range declared in an annotation (`Annotated[int, Range(...)]`, also inside `... | None`; on a
    list, `Annotated[list[float], Range(...)]`, it holds for every element)."""
    if typing.get_origin(tp) is Annotated:
        return next((m for m in tp.__metadata__ if isinstance(m, Range)), None)
    if typing.get_origin(tp) in (Union, types.UnionType):
        return next((r for r in map(field_range, typing.get_args(tp)) if r is not None), None)
    return None


@lru_cache(maxsize=None)
def field_ranges(cls: type) -> dict[str, Range]:
    """Field name -> its declared Range, for the fields of dataclass `cls` that declare one."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: r for f in dataclasses.fields(cls) if (r := field_range(hints[f.name])) is not None}


def is_internal(f: dataclasses.Field) -> bool:
    """A field the program sets (e.g. where the config was read from), not a config key: never read from
    YAML, listed by --help or written into artifacts."""
    return bool(f.metadata.get("internal"))


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Annotated:
        rng = field_range(tp)
        return _type_name(typing.get_args(tp)[0]) + (f" {rng}" if rng is not None else "")
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    """Convert `value` to type `tp`; on failure append a problem naming `where` and return None."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            trial: list[str] = []
            out = _convert(value, arg, where, trial)
            if not trial:
                return out
        problems.append(f"{where}: expected {_type_name(tp)}, got {value!r}")
        return None
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        problems.append(f"{where}: {value!r} is not one of {', '.join(repr(a) for a in allowed)}{hint}")
        return None
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
            return None
        return from_dict(tp, value, where, problems)
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if isinstance(value, (str, dict)) or not isinstance(value, (list, tuple)):
            problems.append(f"{where}: expected a list, got {value!r}")
            return None
        return [_convert(v, item_tp, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp) or (str, Any)
        if value is None:
            return {}
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping, got {value!r}")
            return None
        return {str(k): _convert(v, val_tp, f"{where}.{k}", problems) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        problems.append(f"{where}: expected true or false, got {value!r}")
        return None
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        problems.append(f"{where}: expected an integer, got {value!r}")
        return None
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `3e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        problems.append(f"{where}: expected a number, got {value!r}")
        return None
    if tp is str:
        if isinstance(value, str):
            return value
        problems.append(f"{where}: expected a string, got {value!r}")
        return None
    raise TypeError(f"unsupported config type {tp!r} at {where}")  # a bug in config.py, not user input


def from_dict(cls: type, data: dict, where: str, problems: list[str]):
    """Build dataclass `cls` from `data`, appending every problem found (with its dotted path) to
    `problems`. Missing required fields and unknown keys are problems too."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and not is_internal(f)}
    kwargs: dict[str, Any] = {}
    prefix = f"{where}." if where else ""
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(fields)}"
            problems.append(f"{prefix}{key}: unknown key{hint}")
            continue
        kwargs[key] = _in_range(cls, key, _convert(value, hints[key], f"{prefix}{key}", problems), f"{prefix}{key}", problems)
    for name, f in fields.items():
        if name not in kwargs and f.default is MISSING and f.default_factory is MISSING:
            if dataclasses.is_dataclass(hints[name]):
                kwargs[name] = _convert({}, hints[name], f"{prefix}{name}", problems)
            else:
                problems.append(f"{prefix}{name}: required field is missing ({field_doc(cls, name) or _type_name(hints[name])})")
    # Drop values that failed to convert, so defaults stand in and the cross-field checks still run.
    kwargs = {k: v for k, v in kwargs.items() if v is not None or _allows_none(hints[k])}
    try:
        return cls(**kwargs)
    except TypeError:  # a required field is missing: already reported above
        return None


def _in_range(cls: type, name: str, value: Any, where: str, problems: list[str]) -> Any:
    """`value`, or None (the default stands in) with a problem when it is outside the field's Range."""
    rng = field_ranges(cls).get(name)
    if rng is None:
        return value
    if isinstance(value, list):  # a list of numbers (`Annotated[list[float], Range]`): every element
        bad = [f"{where}[{i}]: {_num(v)} is out of range; allowed: {rng}" for i, v in enumerate(value)
               if isinstance(v, (int, float)) and not isinstance(v, bool) and v not in rng]
        problems.extend(bad)
        return None if bad else value
    if isinstance(value, (bool, str)) or not isinstance(value, (int, float)) or value in rng:
        return value
    problems.append(f"{where}: {_num(value)} is out of range; allowed: {rng}")
    return None


def _allows_none(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(tp)


def parse_override(arg: str) -> tuple[list[str], Any]:
    """`--train.max_steps=30` -> (['train', 'max_steps'], 30). Values are parsed as YAML scalars."""
    body = arg[2:] if arg.startswith("--") else arg
    if "=" not in body:
        raise ValueError(f"override {arg!r} needs the form --section.key=value")
    key, raw = body.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    return key.split("."), value


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses a mapping with the same key twice (YAML itself keeps the last
    one silently: a second `de:` under `languages:` would replace the first)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: let the base class report it
                break
            if first is not None:
                raise ConfigError(f"{key_node.start_mark.name}: duplicate key {key!r} (lines {first + 1} and "
                                  f"{key_node.start_mark.line + 1}); keep one of them")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_yaml_mapping(path: str | os.PathLike | None, example: str) -> dict:
    """The top-level mapping of a YAML config file. Raises ConfigError for a missing file, invalid
    YAML, duplicate keys or a top level that is not a mapping (`example` says what it should hold)."""
    if path is None:
        raise ConfigError(f"no config given: pass --config FILE ({example})")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config: no file {str(path)!r}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e})") from None
    try:
        data = yaml.load(text, Loader=_loader_for(str(path))) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping ({example})")
    return data


def _loader_for(name: str):
    class Loader(_UniqueKeyLoader):
        def __init__(self, stream):
            super().__init__(stream)
            self.name = name
    return Loader


def apply_overrides(data: dict, overrides: list[str] | None, problems: list[str]) -> None:
    """Apply `--a.b.c=value` overrides to `data` in place; malformed ones become problems."""
    for arg in overrides or []:
        try:
            keys, value = parse_override(arg)
        except (ValueError, yaml.YAMLError) as e:
            problems.append(str(e))
            continue
        apply_override(data, keys, value)


def apply_override(data: dict, keys: list[str], value: Any) -> None:
    node = data
    for k in keys[:-1]:
        nxt = node.get(k)
        if not isinstance(nxt, dict):
            nxt = {}
            node[k] = nxt
        node = nxt
    node[keys[-1]] = value


@lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """Field docstrings (a string literal right after the field) of a dataclass, read from source."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def field_doc(cls: type, name: str) -> str:
    return field_docs(cls).get(name, "")


def describe(cls: type, prefix: str = "") -> list[str]:
    """One help line per field, nested sections flattened to dotted keys, defaults shown."""
    lines: list[str] = []
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        if is_internal(f):
            continue
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        doc = field_doc(cls, f.name)
        if dataclasses.is_dataclass(tp):
            lines.append(f"{key}:  {doc}")
            lines += describe(tp, key + ".")
            continue
        origin = typing.get_origin(tp)
        if origin is dict and dataclasses.is_dataclass(typing.get_args(tp)[1]):
            lines.append(f"{key}.<name>:  {doc}")
            lines += describe(typing.get_args(tp)[1], f"{key}.<name>.")
            continue
        if f.default is not MISSING:
            default = f" [default: {f.default!r}]"
        elif f.default_factory is not MISSING:  # type: ignore[misc]
            default = f" [default: {f.default_factory()!r}]"  # type: ignore[misc]
        else:
            default = " [required]"
        lines.append(f"{key} ({_type_name(tp)}){default}:  {doc}")
    return lines


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain dicts/lists (for YAML/JSON artifacts)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if not is_internal(f)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj
