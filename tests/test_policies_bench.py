"""Sampling benchmark: output fields and the verifier-score hook (timings are not asserted)."""

import jax
import numpy as np

from policies import FlowConfig, make_policy
from policies.bench import bench_sampling
from verifiers.cfn_model import CFNConfig, init_cfn, pseudo_counts

TINY = FlowConfig(state_dim=5, instruction_len=6, vocab_size=20, num_tasks=3, horizon=4,
                  patch_size=16, width=32, depth=1, heads=2, expert_width=16, expert_heads=2,
                  num_steps=2)


def test_bench_fields_and_score_hook():
    pol = make_policy("flow", TINY)
    obs = {"state": np.zeros(5, np.float32), "image": np.zeros((64, 64, 3), np.uint8),
           "instruction": np.array([1, 2, 0, 0, 0, 0], np.int32), "task_id": np.int32(0)}
    params = pol.init(jax.random.PRNGKey(0), obs)
    cfn = init_cfn(CFNConfig(hidden_dim=8, depth=1), pol.feature_dim, jax.random.PRNGKey(1))
    res = bench_sampling((pol, params, obs), Ms=(1, 32), repeats=2,
                         score_fn=lambda o, c, k: pseudo_counts(cfn, c.features))
    assert set(res["cached_ms"]) == {1, 32} and set(res["naive_ms"]) == {1, 32}
    f = pol.flop_counts()
    p, s = f["prefix"], f["expert_per_candidate"]
    assert res["prefix_flops"] == p and res["expert_flops_per_candidate"] == s
    assert res["bound_at_M32"] == 1 - (p + 32 * s) / (32 * (p + s))
    assert res["reduction_at_M32"] == 1 - res["cached_ms"][32] / res["naive_ms"][32]
    assert res["flow_ms_at_M32"] == res["cached_ms"][32]
    assert res["score_call_ms_at_M32"] > 0 and res["sample_ms_at_M32"] > 0
    assert res["score_ms_at_M32"] >= 0
    assert res["score_overhead_at_M32"] == res["score_ms_at_M32"] / res["sample_ms_at_M32"]
