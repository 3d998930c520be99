"""Env suites by name. A suite is a family of tasks behind the ``FunctionalEnv`` interface
(the built-in tabletop; simulators such as ManiSkill3 and LIBERO register here too), with the
probes it can supply to the harness: scripted experts for oracle annotation, mode
classification and pi*-distance ranking, where the suite has them.

    suite = get_suite("tabletop")
    env = suite.make("pick_place", "nominal", image=False, max_steps=None)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from core.registry import Registry

SUITES = Registry("env suite", "suite")


@dataclass(frozen=True)
class EnvSuite:
    name: str
    make: Callable[..., Any]
    """make(task, variant, image=..., max_steps=...) -> FunctionalEnv"""
    tasks: tuple[str, ...]
    variants: tuple[str, ...]
    experts: Any = None
    """scripted experts (``MODES``, ``expert_chunk``, ``classify_chunk``, ``wrong_block``), or
    None for a suite without them: the harness then records no expert probes"""
    jittable: bool = True
    """reset/step are pure JAX (compiled evaluation); False: the host driver steps it"""
    write_demos: Callable[..., dict] | None = None
    """write_demos(task, episodes, mix, seed, out_dir, variant=, segment=) -> manifest: the
    suite's demonstration writer (``steerlab demos --suite NAME``), or None"""
    bench: Callable[..., dict] | None = None
    """bench(tasks=None) -> figures: a host-stepped suite's make/reset time and steps/s per task
    (``steerlab bench env --suite NAME``); None: the pure-JAX throughput benchmark"""

    def validate(self, task: str, variant: str) -> None:
        if task not in self.tasks:
            raise ValueError(f"task must be one of {list(self.tasks)} for suite {self.name!r}, "
                             f"got {task!r}")
        if variant not in self.variants:
            raise ValueError(f"variant must be one of {list(self.variants)} for suite "
                             f"{self.name!r}, got {variant!r}")


register_suite = SUITES.register
get_suite = SUITES.lookup
