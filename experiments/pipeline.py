"""The real pipeline stages a grid cell runs: demos → policy SFT → verifier fit → evaluation.

Each shared stage is keyed by the config fields it reads (and its upstream stages), so a grid
over verifiers and M trains each policy once and fits each verifier once. A stage reads only
the fields it declares.
"""

from __future__ import annotations

from pathlib import Path

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
    """Learned verifiers fit here; the others need nothing and leave a note."""
    import jax

    if cfg.verifier.name != "cfn":
        (out / "NOT_FITTED").write_text(f"{cfg.verifier.name} has nothing to fit\n")
        return
    from algos.sft import load_policy
    from verifiers.cfn import fit_cfn

    policy, params, _ = load_policy(str(inputs["policy"] / "run"))
    fit_cfn(policy, params, str(inputs["demos"] / "data"), cfg.verifier.cfn,
            jax.random.PRNGKey(cfg.verifier.cfn.seed), out_dir=str(out / "cfn"))


def evaluate_stage(cfg: RunConfig, inputs: dict[str, Path], out: Path) -> None:
    from experiments.run import run_eval

    verifier_dir = inputs["verifier"] / "cfn" if cfg.verifier.name == "cfn" else None
    run_eval(cfg, inputs["policy"] / "run", verifier_dir, out)


def scaling_stage(cfg: RunConfig, inputs: dict[str, Path], out: Path) -> None:
    from experiments.run import run_scaling

    run_scaling(cfg, inputs["policy"] / "run", out)


DEMOS = Stage("demos", ("task", "demos"), (), build_demos)
POLICY = Stage("policy", ("task", "demos", "policy", "reproduction"), ("demos",),
               train_policy_stage)
VERIFIER = Stage("verifier", ("task", "demos", "policy", "reproduction", "verifier"),
                 ("demos", "policy"),
                 fit_verifier_stage)
STAGES = [DEMOS, POLICY, VERIFIER, Stage("eval", (), ("demos", "policy", "verifier"),
                                         evaluate_stage)]
SCALING_STAGES = [DEMOS, POLICY, Stage("scaling", (), ("policy",), scaling_stage)]

