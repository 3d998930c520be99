"""Resumable ablation grids: a base config crossed with axes, run through a cached stage pipeline.

Layout of a grid directory ``DIR``::

    DIR/grid.json                       spec and the list of cells (for ``grid_status``)
    DIR/stages/<stage>/<key>/           a shared stage output, ``_COMPLETE.json`` written last
    DIR/stages/<stage>/<key>.lock       flock held while the stage is being built
    DIR/cells/<hash8>__k=v,.../         config.json, log.txt, stages.json, the cell's outputs
                                        (result.json), then ``_DONE``; or ``error.json``
    DIR/cells/<name>.lock               flock held while the cell runs
    DIR/results.parquet, results.csv    one row per cell: axes, status, flattened metrics

Pipeline: a list of ``Stage``s in dependency order. Every stage but the last is *shared*: its key
hashes its name, the values of its ``fields`` in the cell config and its deps' keys, so all
cells that agree on those fields reuse one build. The last stage is the cell's own: it runs with
``out_dir`` = the cell directory and must write ``result.json`` there. A stage must only read
the config fields it declares, or shared outputs would silently mix configs.

Stage functions and the config class travel to worker processes by reference, so they must be
importable by module path (module-level functions and classes).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import itertools
import json
import os
import re
import shutil
import socket
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from algos.common.config import ConfigError, from_dict, load_yaml, set_path, stable_hash, to_dict
from algos.common.io import read_json, write_json, write_text
from experiments.stage_cache import Stage, ensure_stage, flock

SPEC_KEYS = ("name", "base", "axes", "zip", "exclude", "config", "pipeline")
DEFAULT_CONFIG = "experiments.config:RunConfig"
DEFAULT_PIPELINE = "experiments.pipeline:STAGES"
BACKENDS = ("local", "ray")
DONE = "_DONE"
RUNNING = "_RUNNING"
ERROR = "error.json"
LOG = "log.txt"
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")


# --- spec ---------------------------------------------------------------------------------------


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


def _get(data: dict, dotted: str, where: str) -> Any:
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
        _get(base_dict, field, f"{where}.{field}")
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
        if any(all(_get(resolved, f, "exclude") == json.loads(json.dumps(v))
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


def validate_pipeline(stages: Sequence[Stage], cfg: Any) -> None:
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
        for f in st.fields:
            _get(data, f, f"stage {st.name}.fields")
        names.add(st.name)


def stage_keys(cfg: Any, stages: Sequence[Stage]) -> dict[str, str]:
    """Key of every shared stage (all but the last) for this config."""
    data = to_dict(cfg)
    keys: dict[str, str] = {}
    for st in stages[:-1]:
        keys[st.name] = stable_hash({
            "stage": st.name,
            "fields": {f: _get(data, f, f"stage {st.name}") for f in st.fields},
            "deps": {d: keys[d] for d in st.deps},
        })
    return keys


def _needed(stages: Sequence[Stage]) -> list[Stage]:
    """The shared stages the last stage depends on, transitively, in pipeline order."""
    by_name = {s.name: s for s in stages}
    need, todo = set(), list(stages[-1].deps)
    while todo:
        n = todo.pop()
        if n not in need:
            need.add(n)
            todo.extend(by_name[n].deps)
    return [s for s in stages[:-1] if s.name in need]


# --- cells --------------------------------------------------------------------------------------


def _log(cell_dir: Path, msg: str) -> None:
    with open(cell_dir / LOG, "a") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")


def _clear_outputs(cell_dir: Path) -> None:
    """Removes a previous attempt's outputs (the log is kept, it is appended to)."""
    for p in cell_dir.iterdir():
        if p.name == LOG:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def run_cell(root: str | Path, name: str, cfg: Any, stages: Sequence[Stage]) -> dict:
    """Runs one cell (in a worker). Never raises for a stage error: records ``error.json``."""
    root = Path(root)
    cell_dir = root / "cells" / name
    cell_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    out = {"name": name, "status": "done", "built": [], "reused": [], "seconds": 0.0,
           "skipped": False, "error": None}
    with flock(root / "cells" / f"{name}.lock", blocking=False) as got:
        if not got:
            return {**out, "status": "running", "skipped": True}
        if (cell_dir / DONE).exists():
            return {**out, "skipped": True}
        _clear_outputs(cell_dir)
        write_json(cell_dir / RUNNING, {"pid": os.getpid(), "host": socket.gethostname(),
                                        "started": t0})
        write_json(cell_dir / "config.json", to_dict(cfg))
        _log(cell_dir, f"start pid={os.getpid()} host={socket.gethostname()}")
        try:
            keys = stage_keys(cfg, stages)
            paths: dict[str, Path] = {}
            data = to_dict(cfg)
            for st in _needed(stages):
                ts = time.time()
                meta = {"fields": {f: _get(data, f, st.name) for f in st.fields},
                        "deps": {d: keys[d] for d in st.deps}}
                paths[st.name], built = ensure_stage(
                    root, st, keys[st.name], cfg, {d: paths[d] for d in st.deps}, meta)
                out["built" if built else "reused"].append(st.name)
                _log(cell_dir, f"stage {st.name} {keys[st.name]} "
                     f"{'built' if built else 'reused'} in {time.time() - ts:.2f}s")
            write_json(cell_dir / "stages.json", {
                n: {"key": keys[n], "path": os.path.relpath(p, cell_dir)} for n, p in paths.items()
            })
            last = stages[-1]
            ts = time.time()
            last.run(cfg, {d: paths[d] for d in last.deps}, cell_dir)
            _log(cell_dir, f"stage {last.name} (cell) ran in {time.time() - ts:.2f}s")
            out["seconds"] = time.time() - t0
            write_json(cell_dir / DONE, {"finished": time.time(), "seconds": out["seconds"],
                                         "stages": keys})
            _log(cell_dir, f"done in {out['seconds']:.2f}s")
        except Exception as e:  # a failing cell must not stop the grid
            err = {"type": type(e).__name__, "message": str(e), "traceback": traceback.format_exc()}
            write_json(cell_dir / ERROR, err)
            _log(cell_dir, f"FAILED {err['type']}: {err['message']}\n{err['traceback']}")
            out.update(status="failed", error=f"{err['type']}: {err['message']}",
                       seconds=time.time() - t0)
        finally:
            (cell_dir / RUNNING).unlink(missing_ok=True)
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cell_status(cell_dir: Path) -> str:
    """done / running / failed / pending, from the markers (a dead runner's cell is pending)."""
    if (cell_dir / DONE).exists():
        return "done"
    try:
        info = read_json(cell_dir / RUNNING)
        if info.get("host") != socket.gethostname() or _pid_alive(int(info["pid"])):
            return "running"  # another host's PID cannot be checked from here
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if (cell_dir / ERROR).exists():
        return "failed"
    return "pending"


def grid_status(out_dir: str | Path) -> dict:
    """Counts of done / running / failed / pending cells (plus total and failed cell names)."""
    root = Path(out_dir)
    try:
        cells = [c["name"] for c in read_json(root / "grid.json")["cells"]]
    except (OSError, ValueError, KeyError) as e:
        raise FileNotFoundError(f"{root}: not a grid directory (no readable grid.json)") from e
    counts = {"done": 0, "running": 0, "failed": 0, "pending": 0}
    failed = []
    for name in cells:
        s = cell_status(root / "cells" / name)
        counts[s] += 1
        if s == "failed":
            failed.append(name)
    return {**counts, "total": len(cells), "failed_cells": failed}


# --- results ------------------------------------------------------------------------------------


def _tabular(df: pd.DataFrame) -> pd.DataFrame:
    """Object columns with mixed types become text so Parquet can store them."""
    df = df.copy()
    for c in df.columns:
        if df[c].dtype == object:
            types_ = {type(v) for v in df[c] if v is not None and not (isinstance(v, float)
                                                                       and v != v)}
            if len(types_) > 1 or (types_ and not types_ <= {str, bool}):
                df[c] = df[c].map(lambda v: v if v is None or (isinstance(v, float) and v != v)
                                  else str(v))
    return df


def collect_results(root: str | Path, cells: Sequence[Cell]) -> pd.DataFrame:
    """One row per cell: cell, hash, status, axes (dotted names), error, flattened metrics."""
    from analysis.load import load_records, record_row

    root = Path(root)
    rows = []
    for cell in cells:
        cdir = root / "cells" / cell.name
        status = cell_status(cdir)
        row = {"cell": cell.name, "hash": cell.hash, "status": status}
        for f, v in cell.axes.items():
            row[f] = json.dumps(v, sort_keys=True) if isinstance(v, list | tuple | dict) else v
        if status == "failed":
            try:
                err = read_json(cdir / ERROR)
                row["error"] = f"{err.get('type')}: {err.get('message')}"
            except (OSError, ValueError):
                row["error"] = "unreadable error.json"
        if status == "done" and (cdir / "result.json").is_file():
            for rec in load_records(cdir / "result.json"):
                r = record_row(rec)
                row.update({k: v for k, v in r.items()
                            if k.startswith(("metrics.", "latency_ms.")) or k == "kind"})
        rows.append(row)
    return pd.DataFrame(rows)


def write_results(root: str | Path, df: pd.DataFrame) -> None:
    root = Path(root)
    df = _tabular(df)
    tmp = root / f".results.{os.getpid()}.parquet.tmp"
    df.to_parquet(tmp, index=False)
    os.replace(tmp, root / "results.parquet")
    write_text(root / "results.csv", df.to_csv(index=False))


# --- runner -------------------------------------------------------------------------------------


def _console():
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


def _report(console, i: int, n: int, res: dict) -> None:
    from rich.markup import escape

    color = {"done": "green", "failed": "red", "running": "yellow"}.get(res["status"], "white")
    extra = ""
    if res.get("built"):
        extra += f" built={','.join(res['built'])}"
    if res.get("error"):
        extra += f" [red]{escape(res['error'][:200])}[/red]"
    console.print(f"[{i:>{len(str(n))}}/{n}] [{color}]{res['status']:<7}[/{color}] "
                  f"{escape(res['name'])} {res.get('seconds', 0.0):.1f}s{extra}", markup=True)


def _crash_result(root: Path, name: str, exc: BaseException) -> dict:
    """The worker itself died (pool broken, Ray worker crash): record it like a cell failure."""
    err = {"type": type(exc).__name__, "message": str(exc), "traceback": "".join(
        traceback.format_exception(type(exc), exc, exc.__traceback__))}
    cdir = root / "cells" / name
    cdir.mkdir(parents=True, exist_ok=True)
    if not (cdir / DONE).exists():
        write_json(cdir / ERROR, err)
    return {"name": name, "status": "failed", "error": f"{err['type']}: {err['message']}",
            "seconds": 0.0, "built": [], "reused": [], "skipped": False}


def _run_local(root: Path, todo: list[Cell], stages, workers: int, on_result) -> None:
    if workers <= 1:  # inline: no process start-up, same code path as a worker
        for cell in todo:
            on_result(run_cell(root, cell.name, cell.config, stages))
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # spawn, not fork: JAX (threads, XLA runtime) is not fork-safe.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = {pool.submit(run_cell, str(root), c.name, c.config, stages): c for c in todo}
        try:
            for fut in as_completed(futures):
                cell = futures[fut]
                try:
                    res = fut.result()
                except Exception as e:
                    res = _crash_result(root, cell.name, e)
                on_result(res)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def _run_ray(root: Path, todo: list[Cell], stages, workers: int, address: str | None,
             cpus_per_cell: float, on_result) -> None:
    try:
        import ray
    except ImportError as e:
        raise RuntimeError("backend='ray' needs ray: pip install 'steerlab[ray]'") from e
    started = False
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=max(1, int(workers * cpus_per_cell)), include_dashboard=False,
                     log_to_driver=False)
        started = True
    try:
        remote = ray.remote(num_cpus=cpus_per_cell, max_retries=0)(run_cell)
        refs = {remote.remote(str(root), c.name, c.config, list(stages)): c for c in todo}
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            for ref in ready:
                cell = refs.pop(ref)
                try:
                    res = ray.get(ref)
                except Exception as e:  # worker crash, unpicklable input, ...
                    res = _crash_result(root, cell.name, e)
                on_result(res)
    finally:
        if started:
            ray.shutdown()


def run_grid(spec: GridSpec | dict | str | os.PathLike, out_dir: str | os.PathLike,
             stages: Sequence[Stage] | str, cfg_cls: type | str, workers: int = 1,
             backend: str = "local", address: str | None = None, cpus_per_cell: float = 1,
             quiet: bool = False) -> pd.DataFrame:
    """Runs (or resumes) a grid and returns the results table (also written to DIR/results.*).

    Done cells are skipped; failed and interrupted ones are retried. ``backend="local"`` runs a
    spawn process pool of ``workers`` (inline when 1); ``"ray"`` submits Ray tasks with
    ``num_cpus=cpus_per_cell`` to a local instance or to the cluster at ``address`` (the grid
    directory must then be on a filesystem all nodes share).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: {backend!r} is not one of {list(BACKENDS)}")
    if workers < 1:
        raise ValueError(f"workers: must be >= 1, got {workers}")
    cfg_cls = resolve(cfg_cls)
    stages = list(resolve(stages))
    spec = spec if isinstance(spec, GridSpec) else load_spec(spec)
    cells = expand(spec, cfg_cls)  # validates the whole spec before anything runs
    if not cells:
        raise ConfigError("grid: every cell was excluded")
    for cell in cells:
        validate_pipeline(stages, cell.config)
        stage_keys(cell.config, stages)
    root = Path(out_dir)
    (root / "cells").mkdir(parents=True, exist_ok=True)
    write_json(root / "grid.json", {
        "spec": spec.to_json(),
        "config": f"{cfg_cls.__module__}:{cfg_cls.__qualname__}",
        "stages": [{"name": s.name, "fields": list(s.fields), "deps": list(s.deps)}
                   for s in stages],
        "cells": [{"name": c.name, "hash": c.hash, "axes": c.axes} for c in cells],
    })
    console = None if quiet else _console()
    done_before = [c for c in cells if (root / "cells" / c.name / DONE).exists()]
    done_names = {c.name for c in done_before}
    todo = [c for c in cells if c.name not in done_names]
    finished = [len(done_before)]
    if console:
        console.print(f"grid [bold]{spec.name}[/bold]: {len(cells)} cells, {len(done_before)} "
                      f"done, {len(todo)} to run ({backend}, workers={workers}) -> {root}")

    def on_result(res: dict) -> None:
        finished[0] += 1
        if console:
            _report(console, finished[0], len(cells), res)

    try:
        if backend == "ray":
            _run_ray(root, todo, stages, workers, address, cpus_per_cell, on_result)
        else:
            _run_local(root, todo, stages, workers, on_result)
    finally:
        df = collect_results(root, cells)
        write_results(root, df)
    if console:
        counts = df["status"].value_counts().to_dict()
        console.print(f"grid {spec.name}: {counts}; table {root / 'results.parquet'}")
    return df


# --- command line -------------------------------------------------------------------------------


def grid_run_cli(spec_path: str, out: str | None = None, workers: int = 1, backend: str = "local",
                 address: str | None = None, cpus_per_cell: float = 1,
                 stages: str | Sequence[Stage] | None = None, cfg_cls: str | type | None = None,
                 dry_run: bool = False) -> int:
    """``steerlab grid run SPEC``: the pipeline and config class come from the arguments, else
    the spec's ``pipeline:``/``config:`` keys, else the defaults. Returns an exit code."""
    console = _console()
    try:
        spec = load_spec(spec_path)
        cfg_cls = resolve(cfg_cls or spec.config or DEFAULT_CONFIG)
        cells = expand(spec, cfg_cls)
    except ConfigError as e:
        console.print(f"[red]grid spec error:[/red] {e}", markup=True)
        return 2
    out = out or str(Path("runs") / spec.name)
    if dry_run:
        for c in cells:
            console.print(c.name)
        console.print(f"{len(cells)} cells -> {out}")
        return 0
    stages = stages or spec.pipeline or DEFAULT_PIPELINE
    df = run_grid(spec, out, stages, cfg_cls, workers=workers, backend=backend, address=address,
                  cpus_per_cell=cpus_per_cell)
    return 0 if (df["status"] == "done").all() else 1


def grid_status_cli(out: str) -> int:
    from rich.markup import escape

    st = grid_status(out)
    console = _console()
    console.print(f"{out}: {st['done']}/{st['total']} done, {st['running']} running, "
                  f"{st['failed']} failed, {st['pending']} pending")
    for name in st["failed_cells"]:
        try:
            err = read_json(Path(out) / "cells" / name / ERROR)
            msg = escape(f"{name}: {err.get('type')}: {err.get('message')}")
            console.print(f"  [red]failed[/red] {msg}", markup=True)
        except (OSError, ValueError):
            console.print(f"  failed {name}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.grid")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run or resume a grid")
    r.add_argument("spec")
    r.add_argument("--out")
    r.add_argument("--workers", type=int, default=1)
    r.add_argument("--backend", choices=BACKENDS, default="local")
    r.add_argument("--address")
    r.add_argument("--cpus-per-cell", type=float, default=1)
    r.add_argument("--stages", help="module:ATTR of the stage list")
    r.add_argument("--config", help="module:Class of the run config")
    r.add_argument("--dry-run", action="store_true")
    s = sub.add_parser("status", help="counts of done/running/failed/pending cells")
    s.add_argument("out")
    a = p.parse_args(argv)
    if a.cmd == "status":
        return grid_status_cli(a.out)
    return grid_run_cli(a.spec, a.out, a.workers, a.backend, a.address, a.cpus_per_cell,
                        a.stages, a.config, a.dry_run)


if __name__ == "__main__":
    sys.exit(main())
