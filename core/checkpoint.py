"""Orbax checkpoints of whole train-state pytrees (params, optimizer state, EMA, step, keys)."""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp

from core.io import BadFileError, missing


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

    def restore(self, target: Any, step: int | None = None, remedy: str | None = None) -> Any:
        """Restores into the structure (and dtypes/shapes) of ``target`` (arrays or
        ``jax.ShapeDtypeStruct``s, e.g. from ``jax.eval_shape``); errors name the step's
        directory (and ``remedy``)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise missing(self.directory, "checkpoint", remedy)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        where = os.path.join(self.directory, str(step))
        with _named_errors(where, remedy):
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


def restore_pytree(path: str, target: Any, remedy: str | None = None) -> Any:
    """Restores what ``save_pytree`` wrote into the structure of ``target`` (arrays or
    ``jax.ShapeDtypeStruct``s; None: as saved); errors name ``path`` (and ``remedy``)."""
    if not os.path.isdir(path):
        raise missing(path, "saved checkpoint", remedy)
    abstract = None if target is None else jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    ckptr = ocp.StandardCheckpointer()
    try:
        with _named_errors(path, remedy):
            return ckptr.restore(os.path.abspath(path), abstract)
    finally:
        ckptr.close()


@contextlib.contextmanager
def _named_errors(path: str, remedy: str | None):
    """Orbax reports a truncated, emptied or mismatched checkpoint with many exception types and
    messages that do not name the checkpoint; re-raise them as one that does."""
    try:
        yield
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - every failure to read is reported the same way
        detail = " ".join(str(e).split())[:300]
        message = f"{path}: unreadable checkpoint ({type(e).__name__}: {detail})"
        raise BadFileError(f"{message}; {remedy}" if remedy else message) from e
