"""Grid specs: a base config crossed with axes, checked against the config class, expanded into
named cells; and the pipeline checks and stage keys that depend only on a cell's config.

A spec is YAML (or a dict) with the keys ``SPEC_KEYS``. Everything is validated before anything
runs, so a typo in a field name fails in seconds rather than after the first cells.
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import json
import os
import re
from collections.abc import Sequence
from typing import Any

from core.config import ConfigError, from_dict, load_yaml, set_path, stable_hash, to_dict
from experiments.grid.stage_cache import Stage

SPEC_KEYS = ("name", "base", "axes", "zip", "exclude", "config", "pipeline")
DEFAULT_CONFIG = "experiments.config:RunConfig"
DEFAULT_PIPELINE = "experiments.pipeline:STAGES"
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclasses.dataclass(frozen=True)
class GridSpec:
    name: str
    base: dict
    axes: dict[str, list]
    zip: list[dict[str, list]] = dataclasses.field(default_factory=list)
    exclude: list[dict] = dataclasses.field(default_factory=list)
    config: str | None = None  # "module:Class" of the run config, for the CLI
    pipeline: str | None = None  # "module:ATTR" of the stage list, for the CLI

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Cell:
    name: str  # directory name: <hash8>__k=v,...
    hash: str  # stable hash of the resolved config
    axes: dict  # the axis assignment that made this cell
    config: Any  # the resolved config object


def resolve(ref: str | Any) -> Any:
    """``"package.module:attr"`` → the object (other values are returned unchanged)."""
    if not isinstance(ref, str):
        return ref
    if ":" not in ref:
        raise ConfigError(f"{ref!r}: expected 'package.module:attribute'")
    mod, attr = ref.split(":", 1)
    obj = importlib.import_module(mod)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _build(cfg_cls: type, data: dict, where: str):
    try:
        return from_dict(cfg_cls, data)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except (TypeError, ValueError) as e:  # missing required fields, __post_init__ checks
        raise ConfigError(f"{where}: {e}") from None


def get_field(data: dict, dotted: str, where: str) -> Any:
    """The value at a dotted field of a config dict; ConfigError naming ``where`` if absent."""
    node: Any = data
    for k in dotted.split("."):
        if not isinstance(node, dict) or k not in node:
            raise ConfigError(f"{where}: unknown config field {dotted!r}")
        node = node[k]
    return node


def _check_values(field: str, values: Any, where: str) -> list:
    if not isinstance(values, list):
        raise ConfigError(f"{where}.{field}: expected a list of values, got {values!r}")
    if not values:
        raise ConfigError(f"{where}.{field}: empty axis (give at least one value)")
    return values


def load_spec(
    path_or_dict: str | os.PathLike | dict, cfg_cls: type | str | None = None
) -> GridSpec:
    """Parses and validates a grid spec (YAML path or dict). With ``cfg_cls``, every field in
    base, axes, zip and exclude is checked against the config class before anything runs."""
    raw = path_or_dict if isinstance(path_or_dict, dict) else load_yaml(str(path_or_dict))
    unknown = sorted(set(raw) - set(SPEC_KEYS))
    if unknown:
        raise ConfigError(f"grid spec: unknown key {unknown[0]!r}; allowed: {list(SPEC_KEYS)}")
    name = raw.get("name", "grid")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"grid spec: name must be a non-empty string, got {name!r}")
    base = raw.get("base") or {}
    if not isinstance(base, dict):
        raise ConfigError(f"base: expected a mapping, got {base!r}")
    axes = raw.get("axes") or {}
    if not isinstance(axes, dict):
        raise ConfigError(f"axes: expected a mapping of field -> list, got {axes!r}")
    for f, v in axes.items():
        _check_values(f, v, "axes")
    zips = raw.get("zip") or []
    if not isinstance(zips, list) or not all(isinstance(g, dict) and g for g in zips):
        raise ConfigError("zip: expected a list of non-empty mappings of field -> list")
    seen = set(axes)
    for i, group in enumerate(zips):
        lengths = {f: len(_check_values(f, v, f"zip[{i}]")) for f, v in group.items()}
        if len(set(lengths.values())) > 1:
            raise ConfigError(f"zip[{i}]: zipped axes need equal lengths, got {lengths}")
        for f in group:
            if f in seen:
                raise ConfigError(f"zip[{i}].{f}: field appears in more than one axis")
            seen.add(f)
    exclude = raw.get("exclude") or []
    if not isinstance(exclude, list) or not all(isinstance(e, dict) and e for e in exclude):
        raise ConfigError("exclude: expected a list of non-empty mappings of field -> value")
    for key in ("config", "pipeline"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise ConfigError(f"{key}: expected 'package.module:attribute', got {raw[key]!r}")
    spec = GridSpec(name, base, dict(axes), list(zips), list(exclude), raw.get("config"),
                    raw.get("pipeline"))
    if cfg_cls is not None:
        validate_spec(spec, resolve(cfg_cls))
    return spec


def validate_spec(spec: GridSpec, cfg_cls: type) -> None:
    """Checks every field and value of the spec against ``cfg_cls`` (one value at a time)."""
    base_cfg = _build(cfg_cls, spec.base, "base")
    base_dict = to_dict(base_cfg)
    checks = [(f, v, "axes") for f, vals in spec.axes.items() for v in vals]
    checks += [(f, v, f"zip[{i}]") for i, g in enumerate(spec.zip) for f, vals in g.items()
               for v in vals]
    checks += [(f, v, f"exclude[{i}]") for i, e in enumerate(spec.exclude) for f, v in e.items()]
    for field, value, where in checks:
        get_field(base_dict, field, f"{where}.{field}")
        _build(cfg_cls, set_path(spec.base, field, value), f"{where}.{field}={value!r}")


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list | tuple | dict):
        return json.dumps(v, separators=(",", ":"), sort_keys=True)
    return str(v)


def cell_dirname(h: str, axes: dict) -> str:
    """``<hash8>__k=v,...`` with anything outside ``[A-Za-z0-9._=,+-]`` replaced by ``_``."""
    text = ",".join(f"{k}={_fmt_value(v)}" for k, v in axes.items())
    text = re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)[:120]
    return f"{h[:8]}__{text}" if text else h[:8]


def expand(spec: GridSpec | dict | str, cfg_cls: type | str) -> list[Cell]:
    """All cells of the grid: axes crossed, zip groups zipped, excludes dropped, each validated."""
    cfg_cls = resolve(cfg_cls)
    spec = spec if isinstance(spec, GridSpec) else load_spec(spec)
    validate_spec(spec, cfg_cls)
    options: list[list[dict]] = [[{f: v} for v in vals] for f, vals in spec.axes.items()]
    for group in spec.zip:
        n = len(next(iter(group.values())))
        options.append([{f: vals[i] for f, vals in group.items()} for i in range(n)])
    cells, by_hash = [], {}
    for combo in itertools.product(*options):
        assignment: dict = {}
        for part in combo:
            assignment.update(part)
        data = spec.base
        for f, v in assignment.items():
            data = set_path(data, f, v)
        cfg = _build(cfg_cls, data, f"cell {assignment}")
        resolved = to_dict(cfg)
        if any(all(get_field(resolved, f, "exclude") == json.loads(json.dumps(v))
                   for f, v in ex.items()) for ex in spec.exclude):
            continue
        h = stable_hash(resolved)
        if h in by_hash:
            raise ConfigError(f"axes: cells {by_hash[h]} and {assignment} give the same config "
                              "(duplicate axis values?)")
        by_hash[h] = assignment
        cells.append(Cell(cell_dirname(h, assignment), h, assignment, cfg))
    return cells


# --- pipeline -----------------------------------------------------------------------------------


_PLACEHOLDER = re.compile(r"\{([^{}]+)\}")


def stage_fields(st: Stage, data: dict) -> tuple[str, ...]:
    """A stage's ``fields`` with each ``{path}`` replaced by that field's value in ``data``
    (``verifier.{verifier.name}``: the chosen verifier's own section only)."""
    sub = lambda m: str(get_field(data, m.group(1), f"stage {st.name}.fields"))
    return tuple(_PLACEHOLDER.sub(sub, f) for f in st.fields)


def validate_pipeline(stages: Sequence[Stage], cfg: Any) -> None:
    """Stage names unique, deps earlier in the list, declared fields present in ``cfg``."""
    if not stages:
        raise ConfigError("stages: the pipeline needs at least one stage (the cell's own)")
    data = to_dict(cfg)
    names: set[str] = set()
    for st in stages:
        if not isinstance(st, Stage):
            raise ConfigError(f"stages: expected Stage objects, got {st!r}")
        if not _NAME_RE.match(st.name) or st.name in names:
            raise ConfigError(
                f"stages: name {st.name!r} must be unique and match {_NAME_RE.pattern}")
        for d in st.deps:
            if d not in names:
                raise ConfigError(f"stage {st.name}: dep {d!r} must name an earlier stage; "
                                  f"earlier: {sorted(names)}")
        for f in stage_fields(st, data):
            get_field(data, f, f"stage {st.name}.fields")
        names.add(st.name)


def stage_keys(cfg: Any, stages: Sequence[Stage]) -> dict[str, str]:
    """Key of every shared stage (all but the last) for this config."""
    data = to_dict(cfg)
    keys: dict[str, str] = {}
    for st in stages[:-1]:
        keys[st.name] = stable_hash({
            "stage": st.name,
            "fields": {f: get_field(data, f, f"stage {st.name}")
                       for f in stage_fields(st, data)},
            "deps": {d: keys[d] for d in st.deps},
        })
    return keys


def needed_stages(stages: Sequence[Stage]) -> list[Stage]:
    """The shared stages the last stage depends on, transitively, in pipeline order."""
    by_name = {s.name: s for s in stages}
    need, todo = set(), list(stages[-1].deps)
    while todo:
        n = todo.pop()
        if n not in need:
            need.add(n)
            todo.extend(by_name[n].deps)
    return [s for s in stages[:-1] if s.name in need]
