"""``steerlab quickstart``: demonstrations → SFT flow policy → fit verifiers → evaluation at
M ∈ {1, 2, 4, 8, 16, 32} with every registered verifier that applies → offline scaling study →
report. It runs as a grid (so an interrupted quickstart resumes where it stopped, and the
policy is trained once), then adds the scaling study and writes ``OUT/report.md``.
"""

from __future__ import annotations

import time
from pathlib import Path

from algos.common.config import from_dict, to_dict
from experiments.config import RunConfig

MS = (1, 2, 4, 8, 16, 32)
# likelihood needs a policy with log-probabilities; the quickstart's flow policy has none (the
# likelihood_ar grid runs it on the token policy). oracle_action (distance to the pi* chunk) is in
# the verifier_comparison grid; oracle_sim is the quickstart's upper reference.
VERIFIERS = ("random", "consensus", "cfn", "oracle_sim")

# 128 paired episodes per cell: every verifier sees the same initial states (eval.seed), so
# each can be compared with random at the same M by McNemar's test in the report.
FULL = {
    "task": "pick_place",
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
                         "collect": {"max_states": 64, "num_search": 4}}},
    "eval": {"episodes": 4, "max_steps": 16, "timing_decisions": 2},
    "scaling": {"Ns": [1, 2, 4, 8], "states": 8, "n_hat": 2, "n_boot": 20},
}


def quickstart_spec(base: dict, Ms=MS, verifiers=VERIFIERS) -> dict:
    """Every verifier at every M > 1; M = 1 (no choice to make) once, as the base policy."""
    return {
        "name": "quickstart",
        "base": base,
        "axes": {"verifier.name": list(verifiers), "eval.M": list(Ms)},
        "exclude": [{"verifier.name": v, "eval.M": 1} for v in verifiers if v != "random"],
    }


def quickstart(out: str, fast: bool = False, workers: int = 2) -> Path:
    from analysis.report import make_report
    from experiments.grid import run_grid, stage_keys
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
    table = run_grid(spec, out_dir, STAGES, RunConfig, workers=workers, backend="local")
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
    report = make_report([str(out_dir)])
    print(f"[quickstart] done in {time.perf_counter() - t0:.0f}s: {report}")
    return Path(report)
