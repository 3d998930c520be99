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

Modules: ``spec`` (specs, cells, stage keys), ``stage_cache`` (content-keyed stage builds under
a lock), ``runner`` (running and resuming cells), ``results`` (status and the results table).
"""

from experiments.grid.results import grid_status, grid_status_cli
from experiments.grid.runner import GridOptions, grid_run_cli, run_grid
from experiments.grid.spec import expand, load_spec, stage_keys
from experiments.grid.stage_cache import COMPLETE, Stage, check_stage, ensure_stage

__all__ = [
    "COMPLETE",
    "GridOptions",
    "Stage",
    "check_stage",
    "ensure_stage",
    "expand",
    "grid_run_cli",
    "grid_status",
    "grid_status_cli",
    "load_spec",
    "run_grid",
    "stage_keys",
]
