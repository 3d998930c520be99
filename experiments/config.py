"""The typed config of one run: demonstrations → policy SFT → verifier fit → evaluation.

One frozen dataclass tree, loaded from YAML and overridden with ``field.path=value``; a grid is
this config plus axes. Sections below are exactly the fields the pipeline stages read.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from algos.common.config import apply_overrides, from_dict, load_yaml
from algos.sft import TrainConfig
from experiments.harness import EvalConfig
from experiments.reproduction import ReproductionConfig
from experiments.scaling import ScalingConfig
from verifiers.cfn import CFNConfig


@dataclass(frozen=True)
class DemosConfig:
    episodes: int = 1000
    """scripted-expert episodes in the training dataset (1000 rather than 200 roughly doubles the
    pick_place policy's M=1 success at the same number of SFT steps: more layouts and colour
    pairings to ground the instruction in)"""
    mix: str = ""
    """a named mixture (premise, counter_premise) or optimal=0.6,hesitant=0.2,... ('' = premise)"""
    segment: int = 4
    """steps per expert-mode segment (the mode is redrawn every segment; 0 = one per episode)"""
    image: bool = False
    """store the 64x64 renders (needed only by policies with policy.flow.image=true)"""
    seed: int = 0


@dataclass(frozen=True)
class VerifierConfig:
    name: str = "random"
    """a registered verifier (steerlab knows: random, consensus, likelihood, oracle_action,
    oracle_sim, cfn)"""
    cfn: CFNConfig = field(default_factory=CFNConfig)
    """CFN head, training and feature collection (used when name = cfn)"""


@dataclass(frozen=True)
class RunConfig:
    task: str = "pick_place"
    variant: str = "nominal"
    """evaluation variant; demonstrations are always collected on nominal"""
    demos: DemosConfig = field(default_factory=DemosConfig)
    policy: TrainConfig = field(default_factory=TrainConfig)
    reproduction: ReproductionConfig = field(default_factory=ReproductionConfig)
    """the check after SFT that the policy reproduces its data (episodes 0 = skip)"""
    verifier: VerifierConfig = field(default_factory=VerifierConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)

    def validate(self) -> None:
        import envs
        from verifiers.registry import known_verifiers

        if self.task not in envs.TASKS:
            raise ValueError(f"task must be one of {list(envs.TASKS)}, got {self.task!r}")
        if self.variant not in envs.VARIANTS:
            raise ValueError(f"variant must be one of {list(envs.VARIANTS)}, got {self.variant!r}")
        if self.verifier.name not in known_verifiers():
            raise ValueError(f"verifier.name: unknown verifier {self.verifier.name!r}; "
                             f"known: {known_verifiers()}")
        if self.demos.episodes < 1:
            raise ValueError(f"demos.episodes must be >= 1, got {self.demos.episodes}")
        if self.demos.segment < 0:
            raise ValueError(f"demos.segment must be >= 0, got {self.demos.segment}")
        if self.train_config().policy_config.image and not self.demos.image:
            raise ValueError("policy.*.image=true needs demonstrations with renders: set "
                             "demos.image=true")
        if self.reproduction.episodes < 0:
            raise ValueError(f"reproduction.episodes must be >= 0, got "
                             f"{self.reproduction.episodes}")
        self.train_config().validate()
        self.eval.validate(self.train_config().policy_config.horizon)
        self.scaling.validate()

    def train_config(self, dataset: str | None = None) -> TrainConfig:
        """The SFT config for this run's task (and dataset path, once the demos exist)."""
        return replace(self.policy, tasks=(self.task,),
                       datasets=(dataset,) if dataset else (), variant="nominal")


def load_run_config(path: str | None, overrides: list[str] = ()) -> RunConfig:
    base = from_dict(RunConfig, load_yaml(path)) if path else RunConfig()
    cfg = apply_overrides(RunConfig, base, list(overrides))
    cfg.validate()
    return cfg
