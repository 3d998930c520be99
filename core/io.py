"""Atomic file writes (nothing half-written is ever left under its final name), and reads that
say which file is broken, where, and how to make it again."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np


class BadFileError(ValueError):
    """A file exists but cannot be read as what it should be (truncated, corrupt, wrong format).
    The message names the file, what is wrong, and how to make it again."""


class MissingFileError(FileNotFoundError, ValueError):
    """A file or directory an input needs is absent; the message says how to make it. Also a
    ValueError: the option that named the path has a bad value."""


def _with_remedy(message: str, remedy: str | None) -> str:
    return f"{message}; {remedy}" if remedy else message


def missing(path: str | os.PathLike, what: str, remedy: str | None = None) -> MissingFileError:
    """The error for an absent input (returned, so callers ``raise missing(...)``)."""
    return MissingFileError(_with_remedy(f"{path}: no {what} there", remedy))


def _write_atomic(path: str | os.PathLike, mode: str, write) -> None:
    """``write(file)`` into a temporary sibling of ``path``, then renamed onto it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """A temporary sibling directory to write into; when the block ends without error it
    replaces ``path`` (a previous one is removed), otherwise it is removed."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", dir=parent)
    try:
        yield tmp
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    _write_atomic(path, "w", lambda f: f.write(text))


def write_npz(path: str | os.PathLike, arrays: dict) -> None:
    """A compressed ``.npz`` of named arrays (read back with ``read_npz``)."""
    _write_atomic(path, "wb", lambda f: np.savez_compressed(f, **arrays))


def write_json(path: str | os.PathLike, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike, remedy: str | None = None) -> Any:
    """The JSON value in ``path``. A missing file raises MissingFileError, an unparsable one
    BadFileError with the line and column, both naming the file (and ``remedy``)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise missing(path, "file", remedy) from None
    except UnicodeDecodeError as e:
        raise BadFileError(_with_remedy(f"{path}: not a text file ({e.reason} at byte "
                                        f"{e.start})", remedy)) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        what = e.msg.removesuffix(" at")  # "Unterminated string starting at"
        raise BadFileError(_with_remedy(f"{path}: not valid JSON ({what} at line {e.lineno}, "
                                        f"column {e.colno})", remedy)) from None


def read_json_object(path: str | os.PathLike, remedy: str | None = None) -> dict:
    """``read_json`` for files that must hold a JSON object."""
    data = read_json(path, remedy)
    if not isinstance(data, dict):
        raise BadFileError(_with_remedy(f"{path}: expected a JSON object, got "
                                        f"{type(data).__name__}", remedy))
    return data


# What numpy raises for a truncated or garbled npz: the zip directory, a member's deflate
# stream, or its .npy header can each be the broken part.
_NPZ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError, KeyError)


def read_npz(path: str | os.PathLike, remedy: str | None = None) -> dict:
    """Every array of an ``.npz`` file, read in full (so a corrupt member fails here, not later
    on first use); errors name the file."""
    if not os.path.isfile(path):
        raise missing(path, "file", remedy)
    try:
        import numpy as np

        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except _NPZ_ERRORS as e:
        raise BadFileError(_with_remedy(f"{path}: unreadable npz archive, truncated or corrupt "
                                        f"({type(e).__name__}: {e})", remedy)) from None
