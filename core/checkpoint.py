"""Orbax checkpoints of whole train-state pytrees (params, optimizer state, EMA, step, keys)."""

from __future__ import annotations

import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Saves every state handed to it under ``directory/<step>``, keeping the last ``keep_last``."""

    def __init__(self, directory: str, keep_last: int = 2):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep_last, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any) -> None:
        self.manager.save(step, args=ocp.args.StandardSave(state))
        self.manager.wait_until_finished()

    def restore(self, target: Any, step: int | None = None) -> Any:
        """Restores into the structure (and dtypes/shapes) of ``target`` (arrays or
        ``jax.ShapeDtypeStruct``s, e.g. from ``jax.eval_shape``)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def close(self) -> None:
        self.manager.close()


def save_pytree(path: str, tree: Any) -> None:
    """One pytree (e.g. exported parameters) under ``path``, written to a temporary directory
    first and renamed, so a reader never sees half a checkpoint."""
    path = os.path.abspath(path)
    tmp = f"{path}.tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp, tree)
    ckptr.wait_until_finished()
    ckptr.close()
    if os.path.exists(path):  # replacing: move the old one aside first (a directory)
        old = f"{path}.old"
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)


def restore_pytree(path: str, target: Any) -> Any:
    """Restores what ``save_pytree`` wrote into the structure of ``target`` (arrays or
    ``jax.ShapeDtypeStruct``s; None: as saved)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"nothing saved at {path}")
    abstract = None if target is None else jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    ckptr = ocp.StandardCheckpointer()
    try:
        return ckptr.restore(os.path.abspath(path), abstract)
    finally:
        ckptr.close()
