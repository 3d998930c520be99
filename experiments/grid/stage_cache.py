"""Content-keyed stage cache: build once under a file lock, publish by atomic rename, verify by
manifest. Used by the grid runner; safe for concurrent processes on one (POSIX) filesystem."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.io import read_json, write_json

COMPLETE = "_COMPLETE.json"


@dataclasses.dataclass(frozen=True)
class Stage:
    """A pipeline step: ``run(cfg, inputs, out_dir)`` where ``inputs`` maps each dep to its dir.

    ``fields`` are the dotted config fields the step reads; with the deps' keys they make the
    cache key, so the step must read no other field. A field may name another field's value in
    braces: ``verifier.{verifier.name}`` is the chosen verifier's own section only."""

    name: str
    fields: tuple[str, ...]
    deps: tuple[str, ...]
    run: Callable[[Any, dict[str, Path], Path], None]



@contextlib.contextmanager
def flock(path: Path, blocking: bool = True):
    """Exclusive ``flock`` on ``path``; yields False if non-blocking and already held.

    The kernel drops the lock when the holder dies (even by SIGKILL), so no stale locks."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            got = True
        except BlockingIOError:
            got = False
        yield got
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def manifest(directory: Path) -> dict[str, dict]:
    """Size and sha256 of every file under ``directory`` (except the completion marker)."""
    out = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != COMPLETE:
            out[p.relative_to(directory).as_posix()] = {"size": p.stat().st_size,
                                                        "sha256": _sha256(p)}
    return out


def check_stage(stage_dir: Path, key: str) -> bool:
    """True when the stage dir holds a marker for ``key`` and every listed file matches it."""
    try:
        marker = read_json(stage_dir / COMPLETE)
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict) or marker.get("key") != key:
        return False
    for rel, info in (marker.get("manifest") or {}).items():
        p = stage_dir / rel
        try:
            if p.stat().st_size != info["size"] or _sha256(p) != info["sha256"]:
                return False
        except (OSError, KeyError, TypeError):
            return False
    return True


def ensure_stage(root: Path, stage: Stage, key: str, cfg: Any, inputs: dict[str, Path],
                 meta: dict | None = None) -> tuple[Path, bool]:
    """Returns ``(DIR/stages/<name>/<key>, built)``, building the stage if needed.

    The build runs in a temp dir under the stage lock; the marker is written last and the dir is
    renamed into place, so a reader sees either nothing or a complete build. A concurrent builder
    of the same key waits on the lock and then reuses. A corrupted dir is moved aside and rebuilt.
    """
    sdir = Path(root) / "stages" / stage.name
    final = sdir / key
    if check_stage(final, key):
        return final, False
    with flock(sdir / f"{key}.lock"):
        if check_stage(final, key):
            return final, False
        for stale in sdir.glob(f".tmp-{key}-*"):  # left by a killed builder; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():
            trash = sdir / f".trash-{key}-{uuid.uuid4().hex[:8]}"
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        tmp = sdir / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            stage.run(cfg, dict(inputs), tmp)
            marker = {"stage": stage.name, "key": key, "created": time.time(), **(meta or {}),
                      "manifest": manifest(tmp)}
            write_json(tmp / COMPLETE, marker)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final, True
