"""The typed config of one run: demonstrations → policy SFT → verifier fit → evaluation.

One frozen dataclass tree, loaded from YAML and overridden with ``field.path=value``; a grid is
this config plus axes. Sections below are exactly the fields the pipeline stages read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace

from algos.registry import ADAPTERS
from algos.sft import TrainConfig
from core.config import apply_overrides, from_dict, load_yaml
from envs.mixture import DEFAULT_MIX
from experiments.harness import EvalConfig
from experiments.reproduction import ReproductionConfig
from experiments.scaling import ScalingConfig
from verifiers.registry import PLUGINS


@dataclass(frozen=True)
class DemosConfig:
    episodes: int = 1000
    """scripted-expert episodes in the training dataset (1000 rather than 200 roughly doubles the
    pick_place policy's M=1 success at the same number of SFT steps: more layouts and colour
    pairings to ground the instruction in)"""
    mix: str = DEFAULT_MIX
    """a named mixture (premise, counter_premise) or optimal=0.6,hesitant=0.2,... (named by
    default, so a run that leaves it out shares its stages with one that names it)"""
    segment: int = 4
    """steps per expert-mode segment (the mode is redrawn every segment; 0 = one per episode)"""
    image: bool = False
    """store the 64x64 renders (needed only by policies with policy.flow.image=true)"""
    seed: int = 0


def _plugin_section(class_name: str, plugins: dict, default: str) -> type:
    """A run-config section choosing one registered plugin: its ``name``, a fit ``seed``, and one
    sub-section per registered plugin (``verifier.cfn.epochs=...``); only the chosen plugin's
    sub-section is read (and hashed by the stage that fits it)."""
    fields = [("name", str, field(default=default)), ("seed", int, field(default=0))]
    for name, plugin in sorted(plugins.items()):
        fields.append((name, plugin.config, field(default_factory=plugin.config)))
    cls = dataclasses.make_dataclass(class_name, fields, frozen=True)
    cls.__module__ = __name__  # picklable by name, as worker processes receive run configs
    return cls


VerifierConfig = _plugin_section("VerifierConfig", PLUGINS, "random")
AdapterConfig = _plugin_section("AdapterConfig", ADAPTERS, "none")


def plugin_options(section) -> object:
    """The chosen plugin's own config (``cfg.verifier`` or ``cfg.adapter`` → its sub-section)."""
    return getattr(section, section.name)


@dataclass(frozen=True)
class RunConfig:
    suite: str = "tabletop"
    """a registered env suite (``envs.SUITES``)"""
    task: str = "pick_place"
    variant: str = "nominal"
    """evaluation variant; demonstrations are always collected on nominal"""
    demos: DemosConfig = field(default_factory=DemosConfig)
    policy: TrainConfig = field(default_factory=TrainConfig)
    reproduction: ReproductionConfig = field(default_factory=ReproductionConfig)
    """the check after SFT that the policy reproduces its data (episodes 0 = skip)"""
    verifier: VerifierConfig = field(default_factory=VerifierConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    """what changes the executed chunk after selection (``none``: the chosen candidate as is)"""
    eval: EvalConfig = field(default_factory=EvalConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)

    def validate(self) -> None:
        import envs

        envs.get_suite(self.suite).validate(self.task, self.variant)
        PLUGINS.lookup(self.verifier.name, "verifier.name")
        ADAPTERS.lookup(self.adapter.name, "adapter.name")
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

    RUN_OWNED_POLICY_FIELDS = ("suite", "tasks", "datasets", "variant")
    """policy fields the run sets itself (``train_config``): a value given for them is ignored,
    so the policy stage's key leaves them out"""

    def train_config(self, dataset: str | None = None) -> TrainConfig:
        """The SFT config for this run's task (and dataset path, once the demos exist)."""
        return replace(self.policy, suite=self.suite, tasks=(self.task,),
                       datasets=(dataset,) if dataset else (), variant="nominal")


def load_run_config(path: str | None, overrides: list[str] = ()) -> RunConfig:
    base = from_dict(RunConfig, load_yaml(path)) if path else RunConfig()
    cfg = apply_overrides(RunConfig, base, list(overrides))
    cfg.validate()
    return cfg
