from dataclasses import dataclass, field

import pytest

from core.config import ConfigError, apply_overrides, from_dict, stable_hash, to_dict
from core.io import read_json, write_json
from experiments.config import RunConfig, load_run_config


@dataclass(frozen=True)
class Inner:
    width: int = 64
    sizes: tuple[int, ...] = (1, 2)


@dataclass(frozen=True)
class Outer:
    inner: Inner = field(default_factory=Inner)
    name: str = "flow"
    lr: float = 1e-3
    limit: int | None = None


def test_round_trip_and_overrides():
    cfg = apply_overrides(Outer, Outer(), ["inner.width=128", "lr=1", "inner.sizes=[4, 8]"])
    assert cfg == Outer(inner=Inner(width=128, sizes=(4, 8)), lr=1.0)
    assert from_dict(Outer, to_dict(cfg)) == cfg
    assert isinstance(cfg.lr, float)


@dataclass(frozen=True)
class Tuned:
    inner: Inner = field(default_factory=lambda: Inner(width=16))  # not Inner's own default


def test_a_partial_section_keeps_its_factory_defaults():
    """A section given in part (a grid's base, the quickstart's) keeps the rest of the value
    its default_factory gives, as a command-line override of one field does."""
    cfg = from_dict(Tuned, {"inner": {"sizes": [3]}})
    assert cfg == Tuned(inner=Inner(width=16, sizes=(3,)))
    assert cfg == apply_overrides(Tuned, Tuned(), ["inner.sizes=[3]"])
    assert from_dict(Tuned, {"inner": {"width": 5}}).inner.width == 5


def test_unknown_field_names_the_field_and_allowed():
    with pytest.raises(ConfigError, match=r"inner\.depth.*allowed: \['sizes', 'width'\]"):
        apply_overrides(Outer, Outer(), ["inner.depth=3"])


@pytest.mark.parametrize("override, field_name", [
    ("inner.width=wide", "inner.width"), ("lr=[1]", "lr"), ("name=3", "name"),
    ("inner.sizes=5", "inner.sizes"),
])
def test_wrong_type_names_the_field(override, field_name):
    with pytest.raises(ConfigError, match=field_name.replace(".", r"\.")):
        apply_overrides(Outer, Outer(), [override])


def test_malformed_override():
    with pytest.raises(ConfigError, match="field.path=value"):
        apply_overrides(Outer, Outer(), ["lr"])


def test_stable_hash_depends_on_values_only():
    assert stable_hash(Outer()) == stable_hash(to_dict(Outer()))
    assert stable_hash(Outer()) != stable_hash(Outer(lr=2e-3))
    assert stable_hash({"a": 1, "b": 2}) == stable_hash({"b": 2, "a": 1})


def test_atomic_json_leaves_no_temp(tmp_path):
    write_json(tmp_path / "x" / "r.json", {"a": 1})
    assert read_json(tmp_path / "x" / "r.json") == {"a": 1}
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["r.json"]


def test_policy_stage_ignores_the_fields_the_run_sets():
    """RunConfig.train_config overwrites policy.tasks/datasets/variant, so changing them must not
    re-key (and retrain) the policy stage; a field SFT reads must."""
    from experiments.grid import stage_keys
    from experiments.pipeline import POLICY, STAGES

    base = load_run_config(None, [])
    key = stage_keys(base, STAGES)[POLICY.name]
    for dead in ("policy.tasks=[sort]", "policy.variant=layout", "policy.datasets=[x]",
                 "policy.autoregressive.width=64"):  # the flow policy reads no AR field
        assert stage_keys(load_run_config(None, [dead]), STAGES)[POLICY.name] == key, dead
    for live in ("policy.steps=10", "policy.flow.width=64", "task=push", "demos.episodes=5"):
        assert stage_keys(load_run_config(None, [live]), STAGES)[POLICY.name] != key, live


def test_fit_stages_hash_only_the_chosen_plugins_section():
    """A grid over verifiers does not refit knn when a cfn option changes, and the eval variant
    (fits see the nominal env) re-keys no fit."""
    from experiments.grid import stage_keys
    from experiments.pipeline import ADAPTER, STAGES, VERIFIER

    def keys(*overrides):
        return stage_keys(load_run_config(None, ["verifier.name=knn", *overrides]), STAGES)

    base = keys()
    for dead in ("verifier.cfn.epochs=2", "variant=layout", "eval.M=8",
                 "adapter.clip_to_data.quantile=0.1"):
        assert keys(dead)[VERIFIER.name] == base[VERIFIER.name], dead
        assert keys(dead)[ADAPTER.name] == base[ADAPTER.name], dead
    for live in ("verifier.knn.k=3", "verifier.seed=1", "eval.replan=2", "policy.steps=10"):
        assert keys(live)[VERIFIER.name] != base[VERIFIER.name], live
    chosen = keys("adapter.name=clip_to_data")[ADAPTER.name]
    assert keys("adapter.name=clip_to_data", "adapter.clip_to_data.quantile=0.1")[
        ADAPTER.name] != chosen


def test_run_config_pickles():
    """Grid workers (spawned processes, Ray tasks) receive run configs by pickling."""
    import pickle

    cfg = load_run_config(None, ["verifier.name=cfn", "verifier.cfn.epochs=2"])
    assert pickle.loads(pickle.dumps(cfg)) == cfg


def test_eval_env_takes_the_time_limit_of_the_runs_mixture():
    """A policy trained on the counter-premise is evaluated under that mixture's longer limit
    (the demonstrations were rolled out under it); eval.max_steps still overrides."""
    from types import SimpleNamespace

    from envs.mixture import time_limit
    from experiments.run import make_env_for

    policy = SimpleNamespace(cfg=SimpleNamespace(image=False))
    default = make_env_for(RunConfig(task="pick_place"), policy).spec.max_steps
    counter = load_run_config(None, ["task=pick_place", "demos.mix=counter_premise"])
    assert make_env_for(counter, policy).spec.max_steps == time_limit("pick_place",
                                                                      "counter_premise") > default
    capped = load_run_config(None, ["demos.mix=counter_premise", "eval.max_steps=30"])
    assert make_env_for(capped, policy).spec.max_steps == 30
