"""The real pipeline stages a grid cell runs: demos → policy SFT → verifier fit → evaluation.

Each shared stage is keyed by the config fields it reads (and its upstream stages), so a grid
over verifiers and M trains each policy once and fits each verifier once. A stage reads only
the fields it declares.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from algos.sft import TrainConfig
from experiments.config import RunConfig
from experiments.grid import Stage


def build_demos(cfg: RunConfig, inputs: dict[str, Path], out: Path) -> None:
    from envs.dataset import write_demos

    write_demos(cfg.task, cfg.demos.episodes, cfg.demos.mix or None, cfg.demos.seed,
                str(out / "data"), image=cfg.demos.image, overwrite=True,
                segment=cfg.demos.segment)


def train_policy_stage(cfg: RunConfig, inputs: dict[str, Path], out: Path) -> None:
    """SFT, then the reproduction check of the policy against its data (into the run dir)."""
    from algos.sft import train_policy
    from experiments.reproduction import check_reproduction, summarize_reproduction

    data = inputs["demos"] / "data"
    run = train_policy(cfg.train_config(dataset=str(data)), str(out / "run"))
    if cfg.reproduction.episodes:
        print(summarize_reproduction(check_reproduction(run, data, cfg.reproduction)))


def fit_verifier_stage(cfg: RunConfig, inputs: dict[str, Path], out: Path) -> None:
    """Learned verifiers fit here (into ``out/fitted``); the others leave a note."""
    from experiments.run import fit_verifier

    if not fit_verifier(cfg, inputs["policy"] / "run", inputs["demos"] / "data", out / "fitted"):
        (out / "NOT_FITTED").write_text(f"{cfg.verifier.name} has nothing to fit\n")


def evaluate_stage(cfg: RunConfig, inputs: dict[str, Path], out: Path) -> None:
    from experiments.run import run_eval

    fitted = inputs["verifier"] / "fitted"
    run_eval(cfg, inputs["policy"] / "run", fitted if fitted.exists() else None, out)


def scaling_stage(cfg: RunConfig, inputs: dict[str, Path], out: Path) -> None:
    from experiments.run import run_scaling

    run_scaling(cfg, inputs["policy"] / "run", out)


# The policy section minus the fields the run overwrites (RunConfig.train_config): changing one
# of those must not retrain an identical policy.
POLICY_FIELDS = tuple(f"policy.{f.name}" for f in dataclasses.fields(TrainConfig)
                      if f.name not in RunConfig.RUN_OWNED_POLICY_FIELDS)
DEMOS = Stage("demos", ("suite", "task", "demos"), (), build_demos)
POLICY = Stage("policy", ("task", "demos", *POLICY_FIELDS, "reproduction"), ("demos",),
               train_policy_stage)
VERIFIER = Stage("verifier", ("task", "demos", *POLICY_FIELDS, "reproduction", "verifier"),
                 ("demos", "policy"),
                 fit_verifier_stage)
STAGES = [DEMOS, POLICY, VERIFIER, Stage("eval", (), ("demos", "policy", "verifier"),
                                         evaluate_stage)]
SCALING_STAGES = [DEMOS, POLICY, Stage("scaling", (), ("policy",), scaling_stage)]

