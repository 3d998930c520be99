"""Does the SFT policy reproduce its data? The check that runs after every policy is trained.

On the harness's own episodes (M = 1, indexed initial states from a seed range disjoint from the
evaluation seeds) it compares the policy with the demonstrations it imitates:

    success         M=1 success within +-10 points of the data's episode success, and in
                    [0.3, 0.7] (room to fail, room for a verifier to help)
    wrong block     the policy grasps a block the instruction does not name in < 5% of episodes
    mode shares     per progress bin, the executed chunks' mode shares (the env suite's classifier)
                    within +-10 points of the data's own decision chunks under the same classifier

and writes ``reproduction.json`` (with the held-out loss curve from ``metrics.jsonl``) into the
policy's run directory.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

SUCCESS_TOLERANCE = 0.10
SUCCESS_RANGE = (0.3, 0.7)
WRONG_BLOCK_MAX = 0.05
SHARE_TOLERANCE = 0.10
MIN_BIN_DECISIONS = 20  # bins with fewer decisions (policy or data) are not compared
FILE = "reproduction.json"


@dataclass(frozen=True)
class ReproductionConfig:
    episodes: int = 256
    seed: int = 9000
    """initial states for the check, disjoint from the evaluation seeds (eval.seed 1000 by
    default; the shipped grids use 1000-3000): settings tuned on the check never see the
    episodes a verifier is judged on"""


def _check(name: str, value: float | None, target: str, passed: bool) -> dict:
    return {"name": name, "value": value, "target": target, "passed": bool(passed)}


def share_difference(policy: list, data: list, policy_n: list, data_n: list) -> float | None:
    """Largest |policy - data| mode share over the bins where both have enough decisions."""
    diffs = [np.max(np.abs(np.asarray(p, float) - np.asarray(d, float)))
             for p, d, n_p, n_d in zip(policy, data, policy_n, data_n, strict=True)
             if n_p >= MIN_BIN_DECISIONS and n_d >= MIN_BIN_DECISIONS]
    return float(max(diffs)) if diffs else None


def compare(metrics: dict, manifest: dict) -> list[dict]:
    """The checks of a policy's harness metrics against its dataset's manifest."""
    s, d = metrics["success_rate"], manifest["success_rate"]
    lo, hi = SUCCESS_RANGE
    pol, dat = metrics["mode_shares_by_bin"], manifest["mode_shares"]
    gap = share_difference(pol["shares"], dat["classified"], pol["decisions"], dat["decisions"])
    return [
        _check("success vs data", s - d, f"|diff| <= {SUCCESS_TOLERANCE}",
               abs(s - d) <= SUCCESS_TOLERANCE),
        _check("success in range", s, f"{lo} <= success <= {hi}", lo <= s <= hi),
        _check("wrong-block rate", metrics["wrong_block_rate"], f"< {WRONG_BLOCK_MAX}",
               metrics["wrong_block_rate"] < WRONG_BLOCK_MAX),
        _check("mode shares vs data (max over bins)", gap, f"<= {SHARE_TOLERANCE}",
               gap is not None and gap <= SHARE_TOLERANCE),
    ]


def heldout_curve(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{"step": r["step"], "heldout_loss": r["heldout/loss"]} for r in rows
            if "heldout/loss" in r]


def check_reproduction(policy_dir: str | os.PathLike, dataset_dir: str | os.PathLike,
                       cfg: ReproductionConfig = ReproductionConfig(),
                       write: bool = True) -> dict:
    """Runs the check for a trained policy run directory against a dataset directory."""
    from core.io import read_json, write_json
    from envs.demos import DEFAULT_SEGMENT
    from envs.experts import MODES
    from experiments.config import RunConfig
    from experiments.harness import EvalConfig, evaluate_compiled, summarize
    from experiments.run import build_setup, make_env_for
    from policies import load_policy
    from verifiers.registry import make_verifier

    manifest = read_json(Path(dataset_dir) / "manifest.json")
    if "mode_shares" not in manifest:
        raise ValueError(f"check-policy: dataset {dataset_dir} has no expert mode shares (it was "
                         f"not written by `steerlab demos`: {manifest.get('source', 'unknown')}); "
                         "give --demos with the demonstrations to check against")
    task = manifest["task"]
    policy, params = load_policy(str(policy_dir))
    # Decisions every `segment` steps, as the data's decision chunks were labelled.
    replan = manifest.get("segment") or DEFAULT_SEGMENT
    # The data's own time limit (a mixture may set one longer than the task's).
    eval_cfg = EvalConfig(M=1, episodes=cfg.episodes, seed=cfg.seed, replan=replan,
                          max_steps=manifest.get("max_steps", 0), annotate_oracle=False,
                          timing_decisions=0)
    run_cfg = replace(RunConfig(task=task), eval=eval_cfg)
    env = make_env_for(run_cfg, policy)
    setup = build_setup(run_cfg, env, policy, make_verifier("random"))
    metrics = summarize(evaluate_compiled(setup, params, None), MODES[task])
    checks = compare(metrics, manifest)
    report = {
        "episodes": cfg.episodes,
        "seed": cfg.seed,
        "dataset": str(dataset_dir),
        "passed": all(c["passed"] for c in checks),
        "checks": checks,
        "success": {"policy": metrics["success_rate"],
                    "policy_ci": [metrics["success_ci_low"], metrics["success_ci_high"]],
                    "data": manifest["success_rate"]},
        "wrong_block_rate": {"policy": metrics["wrong_block_rate"],
                             "data": manifest.get("wrong_block_rate")},
        "mode_shares": {"modes": manifest["mode_shares"]["modes"],
                        "bins": manifest["mode_shares"]["bins"],
                        "policy": metrics["mode_shares_by_bin"]["shares"],
                        "policy_decisions": metrics["mode_shares_by_bin"]["decisions"],
                        "data": manifest["mode_shares"]["classified"],
                        "data_decisions": manifest["mode_shares"]["decisions"]},
        "loss_curve": heldout_curve(policy_dir),
    }
    if write:
        write_json(Path(policy_dir) / FILE, report)
    return report


def summarize_reproduction(report: dict) -> str:
    lines = [f"reproduction check ({report['episodes']} episodes): "
             f"{'PASSED' if report['passed'] else 'NOT MET'}"]
    for c in report["checks"]:
        value = "-" if c["value"] is None else f"{c['value']:.3f}"
        lines.append(f"  {'ok ' if c['passed'] else 'NO '} {c['name']:<38}{value:>8}  "
                     f"(target {c['target']})")
    return "\n".join(lines)
