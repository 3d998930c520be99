"""Running a grid: each cell in a worker (inline, a spawn process pool, or Ray tasks), its stage
outputs shared through the stage cache, its state in marker files so a rerun resumes.

A cell that raises records ``error.json`` and the grid goes on; a rerun skips done cells and
retries failed and interrupted ones. A worker that dies is recorded like a failing cell.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from core.config import ConfigError, to_dict
from core.io import write_json
from experiments.grid.results import (
    DONE,
    ERROR,
    LOG,
    RUNNING,
    collect_results,
    console,
    write_results,
)
from experiments.grid.spec import (
    DEFAULT_CONFIG,
    DEFAULT_PIPELINE,
    Cell,
    GridSpec,
    expand,
    get_field,
    load_spec,
    needed_stages,
    resolve,
    stage_fields,
    stage_keys,
    validate_pipeline,
)
from experiments.grid.stage_cache import Stage, ensure_stage, flock

BACKENDS = ("local", "ray")


@dataclasses.dataclass(frozen=True)
class GridOptions:
    """How a grid runs (not what it computes: none of these enter a stage key or a cell name).

    ``backend="local"`` runs a spawn process pool of ``workers`` (inline when 1); ``"ray"``
    submits Ray tasks with ``num_cpus=cpus_per_cell`` to a local instance or to the cluster at
    ``address`` (the grid directory must then be on a filesystem all nodes share).
    """

    workers: int = 1
    backend: str = "local"
    address: str | None = None  # Ray cluster address; None starts a local Ray instance
    cpus_per_cell: float = 1.0  # Ray CPUs reserved per cell
    quiet: bool = False  # no progress lines on the console

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend: {self.backend!r} is not one of {list(BACKENDS)}")
        if self.workers < 1:
            raise ValueError(f"workers: must be >= 1, got {self.workers}")


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
    """Runs one cell (in a worker). Never raises for a stage error: records ``error.json``.

    Module-level so spawn and Ray workers can import it by reference."""
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
            for st in needed_stages(stages):
                ts = time.time()
                meta = {"fields": {f: get_field(data, f, st.name)
                                   for f in stage_fields(st, data)},
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


def _report(con, i: int, n: int, res: dict) -> None:
    from rich.markup import escape

    color = {"done": "green", "failed": "red", "running": "yellow"}.get(res["status"], "white")
    extra = ""
    if res.get("built"):
        extra += f" built={','.join(res['built'])}"
    if res.get("error"):
        extra += f" [red]{escape(res['error'][:200])}[/red]"
    con.print(f"[{i:>{len(str(n))}}/{n}] [{color}]{res['status']:<7}[/{color}] "
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

    # spawn, never fork: JAX has started threads (XLA runtime) by now, and a forked child of a
    # threaded process can deadlock. Spawn re-imports run_cell, the stages and the config class
    # by module path in each worker.
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


def _run_ray(root: Path, todo: list[Cell], stages, options: GridOptions, on_result) -> None:
    try:
        import ray
    except ImportError as e:
        raise RuntimeError("backend='ray' needs ray: pip install 'steerlab[ray]'") from e
    started = False
    if not ray.is_initialized():
        if options.address:
            ray.init(address=options.address, log_to_driver=False)
        else:
            ray.init(num_cpus=max(1, int(options.workers * options.cpus_per_cell)),
                     include_dashboard=False, log_to_driver=False)
        started = True
    try:
        remote = ray.remote(num_cpus=options.cpus_per_cell, max_retries=0)(run_cell)
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
             stages: Sequence[Stage] | str, cfg_cls: type | str,
             options: GridOptions | None = None) -> pd.DataFrame:
    """Runs (or resumes) a grid and returns the results table (also written to DIR/results.*).

    Done cells are skipped; failed and interrupted ones are retried. ``options`` says where the
    cells run (see ``GridOptions``); the default is inline, one cell at a time.
    """
    options = options or GridOptions()
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
    con = None if options.quiet else console()
    done_before = [c for c in cells if (root / "cells" / c.name / DONE).exists()]
    done_names = {c.name for c in done_before}
    todo = [c for c in cells if c.name not in done_names]
    finished = [len(done_before)]
    if con:
        con.print(f"grid [bold]{spec.name}[/bold]: {len(cells)} cells, {len(done_before)} "
                  f"done, {len(todo)} to run ({options.backend}, workers={options.workers}) "
                  f"-> {root}")

    def on_result(res: dict) -> None:
        finished[0] += 1
        if con:
            _report(con, finished[0], len(cells), res)

    try:
        if options.backend == "ray":
            _run_ray(root, todo, stages, options, on_result)
        else:
            _run_local(root, todo, stages, options.workers, on_result)
    finally:
        df = collect_results(root, cells)
        write_results(root, df)
    if con:
        counts = df["status"].value_counts().to_dict()
        con.print(f"grid {spec.name}: {counts}; table {root / 'results.parquet'}")
    return df


def grid_run_cli(spec_path: str, out: str | None = None, options: GridOptions | None = None,
                 stages: str | Sequence[Stage] | None = None,
                 cfg_cls: str | type | None = None, dry_run: bool = False) -> int:
    """``steerlab grid run SPEC``: the pipeline and config class come from the arguments, else
    the spec's ``pipeline:``/``config:`` keys, else the defaults. Returns an exit code."""
    con = console()
    # a spec error (a ConfigError naming the file and field) reaches the CLI's one-line handler
    spec = load_spec(spec_path)
    cfg_cls = resolve(cfg_cls or spec.config or DEFAULT_CONFIG)
    cells = expand(spec, cfg_cls)
    out = out or str(Path("runs") / spec.name)
    if dry_run:
        for c in cells:
            con.print(c.name)
        con.print(f"{len(cells)} cells -> {out}")
        return 0
    stages = stages or spec.pipeline or DEFAULT_PIPELINE
    df = run_grid(spec, out, stages, cfg_cls, options)
    return 0 if (df["status"] == "done").all() else 1
