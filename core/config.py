"""Typed configs as data: nested frozen dataclasses, loaded from dicts/YAML, overridden from the
command line with ``a.b=value``, validated field by field, hashed stably for caching."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config field is unknown or has a value of the wrong type."""


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Checks ``value`` against the annotation ``tp`` (converting YAML-ish values)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{path}: {value!r} matches none of {tp}")
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{path}: {value!r} is not one of {list(allowed)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, path)
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            items = [_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
        elif origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"{path}: expected {len(args)} items, got {len(value)}")
            items = [_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            inner = args[0] if args else Any
            items = [_coerce(v, inner, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict, path: str = "") -> T:
    """Builds ``cls`` from a (nested) dict; unknown fields and wrong types raise ConfigError."""
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(
            f"unknown field {where}{unknown[0]} in {cls.__name__}; allowed: {sorted(types_)}"
        )
    kwargs = {
        k: _coerce(_over_default(cls, k, v), types_[k], f"{path}.{k}" if path else k)
        for k, v in data.items()
    }
    return cls(**kwargs)


def _over_default(cls: type, name: str, value: Any) -> Any:
    """A partial mapping for a section whose default comes from a ``default_factory``, laid
    over that default: the section's other fields keep the values the factory gives them,
    which may differ from the section class's own defaults."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if not isinstance(value, dict) or f.default_factory is dataclasses.MISSING:
        return value
    default = f.default_factory()
    if not dataclasses.is_dataclass(default):
        return value
    return {**{g.name: getattr(default, g.name) for g in dataclasses.fields(default) if g.init},
            **value}


def to_dict(cfg: Any) -> dict:
    """A JSON-ready nested dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def parse_value(text: str) -> Any:
    """Parses a command-line value as YAML (``3`` -> int, ``[1,2]`` -> list, ``abc`` -> str)."""
    return yaml.safe_load(text)


def set_path(data: dict, dotted: str, value: Any) -> dict:
    """A copy of ``data`` with ``a.b.c`` set to ``value`` (intermediate dicts created)."""
    out = json.loads(json.dumps(data))
    node = out
    keys = dotted.split(".")
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {k} is not a section")
    node[keys[-1]] = value
    return out


def apply_overrides(cls: type[T], base: T | dict, overrides: list[str]) -> T:
    """Applies ``key.path=value`` strings to a config, re-validating the result."""
    data = to_dict(base) if dataclasses.is_dataclass(base) else dict(base)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like field.path=value")
        key, text = item.split("=", 1)
        data = set_path(data, key.strip(), parse_value(text))
    return from_dict(cls, data)


def _yaml_where(e: yaml.YAMLError) -> str:
    """``line L, column C (problem)`` of a YAML error (marks count from 0)."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or getattr(e, "reason", None) or type(e).__name__
    if mark is None:
        return f"({problem})"
    return f"at line {mark.line + 1}, column {mark.column + 1} ({problem})"


def load_yaml(path: str) -> dict:
    """The top-level mapping of a YAML file. A file that is not YAML, or whose top level is not
    a mapping, raises ``BadFileError`` naming the file (and line and column)."""
    from core.io import BadFileError, missing

    if os.path.isdir(path):
        raise BadFileError(f"{path}: is a directory, expected a YAML file")
    if not os.path.isfile(path):
        raise missing(path, "YAML file")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise BadFileError(f"{path}: not valid YAML {_yaml_where(e)}") from None
    except UnicodeDecodeError as e:
        raise BadFileError(f"{path}: not a text file ({e.reason} at byte {e.start})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise BadFileError(f"{path}: expected a mapping of field: value at the top level, got "
                           f"a {type(data).__name__} ({str(data)[:40]!r})")
    return data


def stable_hash(data: Any, length: int = 12) -> str:
    """A hash of a config (dataclass or JSON-able value) that is stable across runs."""
    if dataclasses.is_dataclass(data):
        data = to_dict(data)
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]
