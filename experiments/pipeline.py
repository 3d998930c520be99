"""The real pipeline stages a grid cell runs: demos → policy SFT → verifier fit and adapter fit
→ evaluation.

Each shared stage is keyed by the config fields it reads (and its upstream stages), so a grid
over verifiers, adapters and M trains each policy once and fits each plugin once. A stage reads
only the fields it declares; a fit stage reads only the chosen plugin's own section.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

from algos.sft import TrainConfig
from experiments.config import RunConfig
from experiments.grid import Stage
from policies.registry import POLICIES


def build_demos(cfg: RunConfig, inputs: dict[str, Path], out: Path) -> None:
    """The run's suite's demonstration writer (``EnvSuite.write_demos``)."""
    from envs import get_suite

    write = get_suite(cfg.suite).write_demos
    if write is None:
        raise ValueError(f"suite {cfg.suite!r} has no demonstration writer for the demos stage")
    write(cfg.task, cfg.demos.episodes, cfg.demos.mix or None, cfg.demos.seed,
          str(out / "data"), image=cfg.demos.image, overwrite=True, segment=cfg.demos.segment)


def train_policy_stage(cfg: RunConfig, inputs: dict[str, Path], out: Path) -> None:
    """SFT, then the reproduction check of the policy against its data (into the run dir)."""
    from algos.sft import train_policy
    from envs import get_suite
    from experiments.reproduction import check_reproduction, summarize_reproduction

    data = inputs["demos"] / "data"
    run = train_policy(cfg.train_config(dataset=str(data)), str(out / "run"))
    if not cfg.reproduction.episodes:
        return
    if get_suite(cfg.suite).experts is None:  # the check classifies chunks by expert mode
        print(f"[policy] suite {cfg.suite!r} has no scripted experts: no reproduction check")
        return
    print(summarize_reproduction(check_reproduction(run, data, cfg.reproduction)))


def fit_stage(kind: str, cfg: RunConfig, inputs: dict[str, Path], out: Path) -> None:
    """Fits the run's chosen ``kind`` (verifier or adapter) into ``out/fitted``; a plugin with
    nothing to fit leaves a note. Bound to a kind with ``functools.partial`` (stages are pickled
    into grid workers, so no closures)."""
    from experiments.run import fit_plugin

    data, policy = inputs["demos"] / "data", inputs["policy"] / "run"
    if not fit_plugin(cfg, kind, policy, data, out / "fitted"):
        (out / "NOT_FITTED").write_text(f"{getattr(cfg, kind).name} has nothing to fit\n")


def evaluate_stage(cfg: RunConfig, inputs: dict[str, Path], out: Path) -> None:
    from experiments.run import run_eval

    fitted = {k: inputs[k] / "fitted" for k in ("verifier", "adapter")}
    fitted = {k: (p if p.exists() else None) for k, p in fitted.items()}
    run_eval(cfg, inputs["policy"] / "run", fitted["verifier"], out,
             adapter_dir=fitted["adapter"])


def scaling_stage(cfg: RunConfig, inputs: dict[str, Path], out: Path) -> None:
    from experiments.run import run_scaling

    run_scaling(cfg, inputs["policy"] / "run", out)


# The policy section minus the fields the run overwrites (RunConfig.train_config) and minus the
# sections of the policy classes not chosen: changing one of those must not retrain an
# identical policy.
POLICY_FIELDS = (*(f"policy.{f.name}" for f in dataclasses.fields(TrainConfig)
                   if f.name not in (*RunConfig.RUN_OWNED_POLICY_FIELDS, *POLICIES)),
                 "policy.{policy.policy}")
DEMOS = Stage("demos", ("suite", "task", "demos"), (), build_demos)
POLICY = Stage("policy", ("task", "demos", *POLICY_FIELDS, "reproduction"), ("demos",),
               train_policy_stage)


def plugin_fields(kind: str) -> tuple[str, ...]:
    # a fit reads the nominal env (suite, task), the replan length and its own section only
    return ("suite", f"{kind}.name", f"{kind}.seed", f"{kind}.{{{kind}.name}}", "eval.replan")


VERIFIER = Stage("verifier", ("task", "demos", *POLICY_FIELDS, "reproduction",
                              *plugin_fields("verifier")), ("demos", "policy"),
                 functools.partial(fit_stage, "verifier"))
ADAPTER = Stage("adapter", ("task", "demos", *POLICY_FIELDS, "reproduction",
                            *plugin_fields("adapter")), ("demos", "policy"),
                functools.partial(fit_stage, "adapter"))
STAGES = [DEMOS, POLICY, VERIFIER, ADAPTER,
          Stage("eval", (), ("demos", "policy", "verifier", "adapter"), evaluate_stage)]
SCALING_STAGES = [DEMOS, POLICY, Stage("scaling", (), ("policy",), scaling_stage)]

