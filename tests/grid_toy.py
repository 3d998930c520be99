"""A toy pipeline for the grid engine: cheap arithmetic stages shaped like the real ones
(data → policy → verifier → eval). Each stage build appends one line ``<stage>:<out_dir name>``
to ``<counter_dir>/builds.txt`` so tests can count what was computed.

Workers import these functions by module path as ``grid_toy``: pytest puts ``tests/`` on
``sys.path`` and spawn workers inherit it; other processes (``python -c``, Ray workers) need
``tests/`` on ``PYTHONPATH``."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Literal

from experiments.grid import Stage


@dataclasses.dataclass(frozen=True)
class ToyVerifier:
    name: Literal["random", "consensus", "cfn"] = "random"


@dataclasses.dataclass(frozen=True)
class ToyTrain:
    lr: float = 0.1
    steps: int = 10


@dataclasses.dataclass(frozen=True)
class ToyEval:
    M: int = 1
    episodes: int = 10


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    task: str = "reach"
    seed: int = 0
    verifier: ToyVerifier = dataclasses.field(default_factory=ToyVerifier)
    train: ToyTrain = dataclasses.field(default_factory=ToyTrain)
    eval: ToyEval = dataclasses.field(default_factory=ToyEval)
    sleep_s: float = 0.0  # per stage, to make runs long enough to interrupt
    fail_file: str = ""  # eval raises while this file exists and names the cell's verifier
    counter_dir: str = ""


def _count(cfg: ToyConfig, stage: str, out: Path) -> None:
    if cfg.counter_dir:
        what = f"{stage}:{out.name}"
        # O_APPEND writes of one short line are atomic across processes.
        fd = os.open(Path(cfg.counter_dir) / "builds.txt", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, (what + "\n").encode())
        finally:
            os.close(fd)


def _write(path: Path, data) -> None:
    path.write_text(json.dumps(data, sort_keys=True))


def _read(path: Path):
    return json.loads(path.read_text())


def make_data(cfg: ToyConfig, inputs: dict, out: Path) -> None:
    time.sleep(cfg.sleep_s)
    values = [(cfg.seed * 7 + i * len(cfg.task)) % 11 for i in range(8)]
    _write(out / "data.json", {"values": values})
    _count(cfg, "data", out)


def train_policy(cfg: ToyConfig, inputs: dict, out: Path) -> None:
    time.sleep(cfg.sleep_s)
    data = _read(inputs["data"] / "data.json")["values"]
    weight = sum(data) * cfg.train.lr / cfg.train.steps
    (out / "ckpt").mkdir()
    _write(out / "ckpt" / "params.json", {"w": weight})
    _count(cfg, "policy", out)


def fit_verifier(cfg: ToyConfig, inputs: dict, out: Path) -> None:
    time.sleep(cfg.sleep_s)
    w = _read(inputs["policy"] / "ckpt" / "params.json")["w"]
    bonus = {"random": 0.0, "consensus": 0.1, "cfn": 0.2}[cfg.verifier.name]
    _write(out / "verifier.json", {"bonus": bonus, "w": w})
    _count(cfg, "verifier", out)


def evaluate(cfg: ToyConfig, inputs: dict, out: Path) -> None:
    time.sleep(cfg.sleep_s)
    if cfg.fail_file and os.path.exists(cfg.fail_file):
        if Path(cfg.fail_file).read_text().strip() == cfg.verifier.name:
            raise RuntimeError(f"toy failure for verifier {cfg.verifier.name}")
    w = _read(inputs["policy"] / "ckpt" / "params.json")["w"]
    bonus = _read(inputs["verifier"] / "verifier.json")["bonus"]
    rate = min(1.0, (w % 1.0) * 0.5 + bonus * (1 + cfg.eval.M.bit_length()) / 4)
    successes = round(rate * cfg.eval.episodes)
    result = {
        "schema": "steerlab.result/1",
        "kind": "eval",
        "config": dataclasses.asdict(cfg),
        "metrics": {"success_rate": successes / cfg.eval.episodes,
                    "episodes": cfg.eval.episodes, "mean_length": 10.0 + cfg.eval.M,
                    "latency_ms": {"sample": {"p50": 0.5 * cfg.eval.M, "p95": 0.6 * cfg.eval.M}}},
    }
    _write(out / "result.json", result)
    _count(cfg, "eval", out)


STAGES = [
    Stage("data", ("task", "seed"), (), make_data),
    Stage("policy", ("train.lr", "train.steps"), ("data",), train_policy),
    Stage("verifier", ("verifier.name",), ("data", "policy"), fit_verifier),
    Stage("eval", (), ("policy", "verifier"), evaluate),
]
