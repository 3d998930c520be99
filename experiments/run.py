"""Runs built from a ``RunConfig``: evaluation, scaling study, and the CLI entry points."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import jax
import numpy as np

from algos.base import ADAPTERS_FILE, learns
from algos.registry import ADAPTERS, make_adapter
from core.config import to_dict
from core.io import write_json, write_npz, write_text
from envs import get_suite
from envs.host import HostDriver
from envs.mixture import time_limit
from experiments.config import RunConfig, load_run_config, plugin_options
from experiments.harness import (
    Setup,
    evaluate_compiled,
    summarize,
    time_learner,
    time_phases,
)
from experiments.host_loop import evaluate_host
from experiments.scaling import scaling_study
from policies import load_policy
from policies.base import reads_images
from policies.proposals import check_proposal
from verifiers.base import BuildContext
from verifiers.registry import PLUGINS, get_plugin, make_verifier

REGISTRIES = {"verifier": PLUGINS, "adapter": ADAPTERS}
"""the run-config sections that choose a registered plugin by name, and their registries"""

RESULT_SCHEMA = "steerlab.result/1"


def build_context(cfg: RunConfig, env, policy, fitted_dir: str | os.PathLike | None = None):
    """What a plugin may be built or fitted from: env, policy, the harness's replan length, and
    a fitted directory for learned plugins."""
    return BuildContext(env=env, policy=policy, replan=cfg.eval.replan,
                        fitted_dir=None if fitted_dir is None else str(fitted_dir))


def make_verifier_for(cfg: RunConfig, env, policy, fitted_dir: str | os.PathLike | None):
    """The run's verifier, built from its config section."""
    return make_verifier(cfg.verifier.name, build_context(cfg, env, policy, fitted_dir),
                         plugin_options(cfg.verifier))


def make_adapter_for(cfg: RunConfig, env, policy, fitted_dir: str | os.PathLike | None):
    """The run's adapter, built from its config section."""
    return make_adapter(cfg.adapter.name, build_context(cfg, env, policy, fitted_dir),
                        plugin_options(cfg.adapter))


def make_env_for(cfg: RunConfig, policy):
    """The evaluation env; images are rendered only when the policy reads them. Its time limit
    is ``eval.max_steps``, else the one the run's demonstration mixture sets (the
    counter-premise's is longer than the task's), else the task's."""
    image = reads_images(policy)
    max_steps = cfg.eval.max_steps or time_limit(cfg.task, cfg.demos.mix or None)
    return get_suite(cfg.suite).make(cfg.task, cfg.variant, image=image, max_steps=max_steps)


def build_setup(cfg: RunConfig, env, policy, verifier, adapter=None) -> Setup:
    experts = get_suite(cfg.suite).experts
    if "log_prob" in verifier.requires and not policy.has_log_prob:
        raise ValueError(f"verifier {verifier.name!r} needs the policy's log-probabilities; the "
                         f"{type(policy).__name__} policy has none (use policy.policy="
                         "autoregressive)")
    check_proposal(cfg.eval.proposal, policy, verifier.requires)
    oracle = (make_verifier("oracle_sim", BuildContext(env=env, replan=cfg.eval.replan))
              if cfg.eval.annotate_oracle and get_suite(cfg.suite).jittable else None)
    needs_expert = cfg.eval.classify_modes or "expert_chunk" in verifier.requires
    if "expert_chunk" in verifier.requires and experts is None:
        raise ValueError(f"verifier {verifier.name!r} needs expert chunks, which suite "
                         f"{cfg.suite!r} has no experts for")
    return Setup(env=env, policy=policy, verifier=verifier, cfg=cfg.eval, oracle=oracle,
                 expert=experts if needs_expert else None,
                 adapter=adapter or make_adapter_for(cfg, env, policy, None))


def _episode_rows(records: dict[str, np.ndarray]) -> str:
    rows = []
    for i in range(len(records["success"])):
        row = {"episode": i, "success": bool(records["success"][i]),
               "progress": float(records["progress"][i]), "length": int(records["length"][i]),
               "nonfinite_actions": int(records["nonfinite_actions"][i])}
        alive = records.get("decisions/alive")
        if alive is not None:
            a = alive[i]
            row["decisions"] = int(a.sum())
            row["mean_chosen_score"] = float(records["decisions/score"][i][a].mean())
            if "decisions/oracle_gap" in records:
                row["mean_oracle_gap"] = float(records["decisions/oracle_gap"][i][a].mean())
            if "decisions/mode_weights" in records:
                row["pi_star_share"] = float(records["decisions/mode_weights"][i][a][:, 0].mean())
                row["wrong_block"] = bool(records["decisions/wrong_block"][i][a].any())
        rows.append(json.dumps(row))
    return "\n".join(rows) + "\n"


def run_eval(cfg: RunConfig, policy_dir, verifier_dir, out_dir, verbose: bool = True,
             adapter_dir=None) -> dict:
    """Evaluates policy + verifier (+ adapter) at M candidates; writes config, episodes and
    result.json."""
    cfg.validate()
    policy, params = load_policy(str(policy_dir))
    env = make_env_for(cfg, policy)
    setup = build_setup(cfg, env, policy, make_verifier_for(cfg, env, policy, verifier_dir),
                        make_adapter_for(cfg, env, policy, adapter_dir))
    vstate, astate = setup.verifier.state, setup.adapter.state
    jittable = get_suite(cfg.suite).jittable
    t0 = time.perf_counter()
    if jittable:
        records = evaluate_compiled(setup, params, vstate, astate)
    else:  # a simulator stepped on the host, host_envs at a time
        with HostDriver(env.factory, num_envs=min(cfg.eval.host_envs, cfg.eval.episodes),
                        workers=min(cfg.eval.host_workers, cfg.eval.episodes)) as driver:
            records = evaluate_host(setup, driver, params, vstate, astate)
    eval_s = time.perf_counter() - t0
    metrics = summarize(records, setup.expert.MODES[cfg.task] if setup.expert else ())
    metrics["eval_s"] = eval_s
    if cfg.eval.timing_decisions and jittable:  # the per-phase pass steps a functional env
        metrics.update(time_phases(setup, params, vstate, cfg.eval.timing_decisions, astate))
    if learns(setup.adapter):
        metrics.update(time_learner(setup.adapter, astate))
        if setup.adapter.continual:
            metrics.update(stream_halves(records["success"]))
    out = Path(out_dir)
    write_json(out / "config.json", to_dict(cfg))
    write_text(out / "episodes.jsonl", _episode_rows(records))
    learned = {k.removeprefix("learner/params/"): v for k, v in records.items()
               if k.startswith("learner/params/")}
    if learned:  # a continual learner's adapter after every episode (the streams' checkpoints)
        write_npz(out / ADAPTERS_FILE, learned)
    result = {"schema": RESULT_SCHEMA, "kind": "eval", "config": to_dict(cfg),
              "policy_dir": str(policy_dir), "metrics": metrics}
    for name, path in (("verifier_dir", verifier_dir), ("adapter_dir", adapter_dir)):
        if path is not None:
            result[name] = str(path)
    write_json(out / "result.json", result)
    if verbose:
        adapted = "" if cfg.adapter.name == "none" else f" adapter={cfg.adapter.name}"
        print(f"[eval] {cfg.task}/{cfg.variant} verifier={cfg.verifier.name}{adapted} "
              f"M={cfg.eval.M}: "
              f"success {metrics['success_rate']:.3f} "
              f"[{metrics['success_ci_low']:.3f}, {metrics['success_ci_high']:.3f}] "
              f"({metrics['episodes']} episodes, {eval_s:.1f}s)")
    return result


def stream_halves(success: np.ndarray) -> dict:
    """Success over the first and the second half of a continual learner's streams: stream s
    runs episodes s, s + S, ... (``evaluate_compiled``), so the first half of every stream is
    episodes i < N / 2 (for any arm: the same initial states, the frozen base's control)."""
    half = len(success) // 2
    return {"stream_first_half_success": float(np.mean(success[:half])),
            "stream_second_half_success": float(np.mean(success[half:]))}


def run_scaling(cfg: RunConfig, policy_dir, out_dir, episodes: int = 40) -> dict:
    """The offline best-of-N study on held-out demonstrations (a fresh seed)."""
    from envs.dataset import load_demos
    from envs.demos import write_demos

    policy, params = load_policy(str(policy_dir))
    out = Path(out_dir)
    heldout = out / "heldout_demos"
    if not (heldout / "manifest.json").exists():
        write_demos(cfg.task, episodes, cfg.demos.mix or None, cfg.demos.seed + 10_000,
                    str(heldout), image=bool(getattr(policy.cfg, "image", False)), overwrite=True,
                    segment=cfg.demos.segment)
    chunks = load_demos(str(heldout)).chunks(policy.horizon)
    t0 = time.perf_counter()
    curves = scaling_study(policy, params, chunks, cfg.scaling)
    result = {"schema": RESULT_SCHEMA, "kind": "scaling", "config": to_dict(cfg),
              "policy_dir": str(policy_dir), "metrics": {"scaling_s": time.perf_counter() - t0},
              "curves": curves}
    for method, c in curves["methods"].items():
        result["metrics"][f"{method}.b"] = c["fit"]["b"]
        result["metrics"][f"{method}.r2"] = c["fit"]["r2"]
    write_json(out / "config.json", to_dict(cfg))
    write_json(out / "result.json", result)
    for method, c in curves["methods"].items():
        f = c["fit"]
        print(f"[scaling] {method}: e(N) = {f['a']:.3f}·N^{f['b']:.3f}  R²={f['r2']:.3f}  "
              f"b 95% CI [{f['b_ci'][0]:.3f}, {f['b_ci'][1]:.3f}]")
    return result


# ---- CLI entry points -------------------------------------------------------------------


def train_policy_cli(config_path: str | None, overrides: list[str], out: str) -> None:
    from algos.sft import TrainConfig, default_train_config, train_policy
    from core.config import apply_overrides, from_dict, load_yaml

    base = from_dict(TrainConfig, load_yaml(config_path)) if config_path else \
        default_train_config("pick_place")
    cfg = apply_overrides(TrainConfig, base, overrides)
    cfg.validate()
    for path in cfg.datasets:
        if not os.path.exists(os.path.join(path, "manifest.json")):
            raise FileNotFoundError(f"datasets: no dataset at {path!r} (make one with "
                                    "`steerlab demos --out PATH`)")
    train_policy(cfg, out)


def fit_plugin(cfg: RunConfig, kind: str, policy_dir, demos_path, out) -> bool:
    """Fits the run's chosen ``kind`` ("verifier" or "adapter") for the policy on a dataset into
    ``out``; False if that plugin has nothing to fit."""
    from envs.dataset import load_demos

    section = getattr(cfg, kind)
    plugin = REGISTRIES[kind][section.name]
    if plugin.fit is None:
        return False
    policy, params = load_policy(str(policy_dir))
    demos = load_demos(str(demos_path))
    # Fits see the nominal env their data came from; the eval variant stays out of the fit (and
    # of its stage key). A learner that adapts on the test variant is an eval-time adapter.
    env = get_suite(cfg.suite).make(cfg.task, "nominal",
                                    image=reads_images(policy))
    plugin.fit(plugin_options(section), build_context(cfg, env, policy), params, demos,
               jax.random.PRNGKey(section.seed), str(out))
    return True


def policy_dataset(policy_dir: str, demos: str | None) -> str:
    """``--demos``, or the dataset the policy run at ``--policy`` was trained on."""
    from algos.sft import load_config

    if not os.path.isfile(os.path.join(policy_dir, "config.json")):
        raise FileNotFoundError(f"--policy: no trained policy run at {policy_dir!r}")
    return demos or load_config(policy_dir).datasets[0]


def fit_cli(kind: str, name: str, policy_dir: str, demos: str | None, out: str,
            overrides: list[str]) -> None:
    """``steerlab fit-verifier|adapt NAME --policy RUN --out DIR [field=value ...]``: the fields
    are the plugin's own (``epochs=8``), or run-config paths (``verifier.seed=1``)."""
    command = {"verifier": "fit-verifier", "adapter": "adapt"}[kind]
    trainable = sorted(n for n, p in REGISTRIES[kind].items() if p.fit is not None)
    if name not in trainable:
        raise ValueError(f"{command}: unknown or untrainable name {name!r}; "
                         f"trainable: {trainable}")
    dataset = policy_dataset(policy_dir, demos)
    cfg = load_run_config(None, [f"{kind}.name={name}", *plugin_overrides(kind, name, overrides)])
    fit_plugin(cfg, kind, policy_dir, dataset, out)
    print(os.path.abspath(out))


def plugin_overrides(kind: str, name: str, overrides: list[str]) -> list[str]:
    """A plugin command's ``field=value``: a run-config path (``task=``, ``eval.M=``,
    ``verifier.seed=``) as is, anything else a field of the plugin's own section."""
    top = {f.name for f in dataclasses.fields(RunConfig)}
    return [o if o.split("=", 1)[0].split(".", 1)[0] in top else f"{kind}.{name}.{o}"
            for o in overrides]


def adapt_online_cli(name: str, policy_dir: str, out: str, overrides: list[str]) -> dict:
    """``steerlab adapt NAME`` for a test-time learner (``algos.base``), which fits nothing
    offline: the policy is deployed with the learner on the run's task and variant, and
    without it (the frozen base) on the same initial states (``adapted/``, ``frozen/``);
    ``comparison.json`` holds both success rates (Wilson), McNemar and the within-episode
    adaptation curves (mean progress at each decision; the CLI plots them). A continual learner
    on a shifted variant is then checked back on ``nominal``: its streams' final adapters,
    frozen (``after_nominal/``), against the frozen base there (``nominal_frozen/``). A rerun
    keeps an arm whose result was written with the same config."""
    from core.io import read_json
    from core.stats import mcnemar

    cfg = load_run_config(None, [f"adapter.name={name}",
                                 *plugin_overrides("adapter", name, overrides)])
    frozen = dataclasses.replace(cfg, adapter=dataclasses.replace(cfg.adapter, name="none"))
    arms = {"adapted": cfg, "frozen": frozen}
    options = plugin_options(cfg.adapter)
    after = getattr(options, "continual", False) and cfg.variant != "nominal"
    if after:  # the streams' final adapters, frozen, back on the unshifted task
        kept = options.frozen_final(str(Path(out) / "adapted"))
        arms["after_nominal"] = dataclasses.replace(
            cfg, variant="nominal", adapter=dataclasses.replace(cfg.adapter, **{name: kept}))
        arms["nominal_frozen"] = dataclasses.replace(frozen, variant="nominal")
    results, rerun = {}, set()
    for arm, c in arms.items():
        path = Path(out) / arm / "result.json"
        stale = arm == "after_nominal" and "adapted" in rerun  # it deploys adapted's adapters
        if path.is_file() and read_json(path)["config"] == to_dict(c) and not stale:
            results[arm] = read_json(path)
            print(f"[adapt] {arm}: kept {path}")
        else:
            results[arm] = run_eval(c, policy_dir, None, Path(out) / arm)
            rerun.add(arm)
    success = {arm: np.asarray([json.loads(line)["success"] for line in
                                (Path(out) / arm / "episodes.jsonl").read_text().splitlines()])
               for arm in arms}
    metrics = {arm: r["metrics"] for arm, r in results.items()}
    comparison = {
        "adapter": name, "task": cfg.task, "variant": cfg.variant, "episodes": cfg.eval.episodes,
        "eval_seed": cfg.eval.seed,
        **{arm: {k: m[k] for k in ("success_rate", "success_ci_low", "success_ci_high",
                                   "mean_final_progress", "mean_length") if k in m}
           for arm, m in metrics.items()},
        "mcnemar": mcnemar(success["adapted"], success["frozen"]),
        "curves": {arm: metrics[arm].get("progress_by_decision") for arm in ("adapted", "frozen")},
        "learner": {k: v for k, v in metrics["adapted"].items() if k.startswith("learner")},
    }
    if "stream_first_half_success" in metrics["adapted"]:  # a continual learner
        comparison["stream_halves"] = {arm: stream_halves(success[arm])
                                       for arm in ("adapted", "frozen")}
    if after:
        comparison["mcnemar_after_nominal"] = mcnemar(success["after_nominal"],
                                                      success["nominal_frozen"])
    write_json(Path(out) / "comparison.json", comparison)
    m = comparison["mcnemar"]
    print(f"[adapt] {name} on {cfg.task}/{cfg.variant}: success "
          f"{comparison['adapted']['success_rate']:.3f} (adapted) vs "
          f"{comparison['frozen']['success_rate']:.3f} (frozen), McNemar p {m['p_value']:.3g} "
          f"on {cfg.eval.episodes} paired episodes")
    if after:
        print(f"[adapt] back on nominal with the streams' final adapters: "
              f"{comparison['after_nominal']['success_rate']:.3f} vs "
              f"{comparison['nominal_frozen']['success_rate']:.3f} (frozen base), McNemar p "
              f"{comparison['mcnemar_after_nominal']['p_value']:.3g}")
    return comparison


def eval_cli(config_path: str | None, overrides: list[str], out: str) -> None:
    """``steerlab eval policy_dir=... [verifier_dir=...] [adapter_dir=...] field=value ...``"""
    paths = {k: v for k, v in (o.split("=", 1) for o in overrides if "=" in o)
             if k in ("policy_dir", "verifier_dir", "adapter_dir")}
    rest = [o for o in overrides if o.split("=", 1)[0] not in paths]
    if "policy_dir" not in paths:
        raise ValueError("eval: give policy_dir=RUN_DIR (a trained policy run directory)")
    cfg = load_run_config(config_path, rest)
    run_eval(cfg, paths["policy_dir"], paths.get("verifier_dir"), out,
             adapter_dir=paths.get("adapter_dir"))


def check_policy_cli(policy_dir: str, demos: str | None, episodes: int) -> None:
    from experiments.reproduction import (
        ReproductionConfig,
        check_reproduction,
        summarize_reproduction,
    )

    dataset = policy_dataset(policy_dir, demos)
    report = check_reproduction(policy_dir, dataset, ReproductionConfig(episodes=episodes))
    print(summarize_reproduction(report))
    print(f"wrote {os.path.join(policy_dir, 'reproduction.json')}")


def scaling_cli(policy_dir: str, demos: str | None, out: str, overrides: list[str]) -> None:
    cfg = load_run_config(None, overrides)
    run_scaling(cfg, policy_dir, out)


def bench_sampling_cli(policy_dir: str | None, verifier: str | None, Ms=(1, 4, 8, 16, 32, 64),
                       repeats: int = 20) -> dict:
    """Sampling latency per M, with a verifier's scoring timed too when one is named (a learned
    one unfitted, at its fitted size: the weights do not change the cost). Without
    ``policy_dir`` the policy is a fresh-init default flow policy."""
    from policies.bench import bench_sampling, load_bench_policy

    if not Ms or any(int(m) < 1 for m in Ms):
        raise ValueError(f"bench sampling --Ms: candidate counts must be >= 1, got {list(Ms)}")
    if repeats < 1:
        raise ValueError(f"bench sampling --repeats: must be >= 1, got {repeats}")
    plugin = get_plugin(verifier) if verifier else None
    envless = ("features", "log_prob")
    if plugin is not None and not set(plugin.requires) <= set(envless):
        allowed = sorted(n for n, p in PLUGINS.items() if set(p.requires) <= set(envless))
        raise ValueError(f"bench sampling --verifier: {verifier!r} needs {plugin.requires}, "
                         f"which a benchmark without an env cannot give; allowed: {allowed}")
    bench = load_bench_policy(policy_dir)  # once: the verifier is sized from this policy
    score_fn = None
    if plugin is not None:
        if "log_prob" in plugin.requires and not bench[0].has_log_prob:
            raise ValueError(f"bench sampling --verifier: {verifier!r} needs log-probabilities, "
                             f"which the {bench[0].name} policy has none of")
        cfg, context = plugin.config(), BuildContext(policy=bench[0])
        v = (plugin.init(cfg, context, jax.random.PRNGKey(0)) if plugin.init is not None
             else plugin.build(cfg, context))
        score_fn = lambda obs, cands, key: v.score(v.state, obs, cands, key)
    return bench_sampling(bench, Ms=tuple(int(m) for m in Ms), repeats=repeats,
                          score_fn=score_fn)
