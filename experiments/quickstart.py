"""``steerlab quickstart``: demonstrations → SFT flow policy → fit verifiers → evaluation at
M ∈ {1, 4, 16, 32} with every registered verifier that applies → offline scaling study →
report. The runs go as a grid (so an interrupted quickstart resumes where it stopped, and the
policy is trained once) plus the scaling study; the command then writes ``OUT/report.md``.
"""

from __future__ import annotations

import time
from pathlib import Path

from core.config import from_dict, to_dict
from experiments.config import RunConfig
from verifiers.registry import PLUGINS

# M = 2 and 8 run in the premise_counter_premise grid with the rest of the sweep: their twelve
# cells would take the quickstart past its 20 minutes on 2 cores.
MS = (1, 4, 16, 32)


def quickstart_verifiers(has_log_prob: bool = False) -> list[str]:
    """Every registered verifier that takes part in the quickstart (``VerifierPlugin.quickstart``)
    and whose needs its flow policy meets: it has no log-probabilities, so likelihood runs in
    the likelihood_ar grid instead (the built-in suite gives env_state and expert chunks)."""
    return [name for name, p in PLUGINS.items()
            if p.quickstart and (has_log_prob or "log_prob" not in p.requires)]


# 128 paired episodes per cell: every verifier sees the same initial states (eval.seed), so
# each can be compared with random at the same M by McNemar's test in the report.
# The Cal-QL critic takes 2000 updates here instead of the grids' 5000 (a fit of about two
# minutes instead of five); on the premise policy the shorter fit gives 77/84/80% at
# M = 4/16/32 against 81/86/81% (README, Cal-QL section). The Bradley–Terry judge learns from
# 3200 decision states for 1500 updates, without the label-ceiling samples (a fit of about
# four minutes instead of twenty; README, Bradley–Terry section).
FULL = {
    "task": "pick_place",
    "verifier": {"calql": {"learner": {"steps": 2000}},
                 "bradley_terry": {"states": 3200, "predictability_samples": 0,
                                   "learner": {"steps": 1500}}},
    "eval": {"episodes": 128, "timing_decisions": 10},
}
# A smoke-sized run (used by the tests): every stage runs, nothing is meaningful.
FAST = {
    "task": "pick_place",
    "demos": {"episodes": 12},
    "reproduction": {"episodes": 8},
    "policy": {"steps": 20, "steps_per_call": 10, "eval_episodes": 0, "checkpoint_every": 10,
               "heldout_every": 10,
               "flow": {"width": 32, "depth": 1, "heads": 2, "expert_width": 16,
                        "expert_heads": 2, "num_steps": 2}},
    "verifier": {"cfn": {"epochs": 1, "hidden_dim": 32, "depth": 1, "batch_size": 64,
                         "collect": {"max_states": 64, "num_search": 4}},
                 "calql": {"base_samples": 2,
                           "learner": {"steps": 20, "updates_per_call": 10, "warmup": 5,
                                       "hidden": [32], "batch_size": 32}},
                 "bradley_terry": {"samples": 4, "representatives": 2, "states": 16,
                                   "predictability_samples": 0,
                                   "judge": {"width": 16, "depth": 1, "heads": 2},
                                   "learner": {"steps": 20, "updates_per_call": 10,
                                               "batch_size": 16}}},
    "eval": {"episodes": 4, "max_steps": 16, "timing_decisions": 2},
    "scaling": {"Ns": [1, 2, 4, 8], "states": 8, "n_hat": 2, "n_boot": 20},
}


def quickstart_spec(base: dict, Ms=MS, verifiers=None) -> dict:
    """Every verifier at every M > 1; M = 1 (no choice to make) once, as the base policy."""
    verifiers = quickstart_verifiers() if verifiers is None else verifiers
    return {
        "name": "quickstart",
        "base": base,
        # verifiers vary fastest, so the two workers fit different verifiers at the same time
        # (with M fastest, both waited on one verifier's fit)
        "axes": {"eval.M": list(Ms), "verifier.name": list(verifiers)},
        "exclude": [{"verifier.name": v, "eval.M": 1} for v in verifiers if v != "random"],
    }


def quickstart(out: str, fast: bool = False, workers: int = 2) -> Path:
    """Runs every stage into ``out`` (resuming) and returns it; ``steerlab quickstart`` then
    writes the report from it."""
    from experiments.grid import GridOptions, run_grid, stage_keys
    from experiments.pipeline import POLICY, STAGES
    from experiments.run import run_scaling

    t0 = time.perf_counter()
    base = FAST if fast else FULL
    spec = quickstart_spec(base, Ms=(1, 2) if fast else MS)
    out_dir = Path(out)
    print(f"[quickstart] {len(spec['axes']['verifier.name'])} verifiers × M ∈ "
          f"{spec['axes']['eval.M']} on {base['task']} → {out_dir}")
    # Evaluation cells are mostly single-threaded (compilation, small batched ops), so two
    # workers on two cores nearly halve the sweep; the shared stages are built once under a lock.
    table = run_grid(spec, out_dir, STAGES, RunConfig, GridOptions(workers=workers))
    failed = table[table["status"] != "done"]
    if len(failed):
        raise RuntimeError(f"quickstart: {len(failed)} cells failed; see "
                           f"`steerlab grid status {out_dir}`")

    cfg = from_dict(RunConfig, to_dict(from_dict(RunConfig, base)))
    policy_key = stage_keys(cfg, STAGES)[POLICY.name]
    policy_dir = out_dir / "stages" / POLICY.name / policy_key / "run"
    scaling_dir = out_dir / "scaling"
    if not (scaling_dir / "result.json").exists():
        run_scaling(cfg, policy_dir, scaling_dir)
    print(f"[quickstart] runs done in {time.perf_counter() - t0:.0f}s")
    return out_dir
