"""End to end on the built-in suite: demos -> SFT -> checkpoint -> load -> evaluation."""

import json
import os

import jax
import numpy as np

from algos.sft import TrainConfig, load_checkpoint, train_policy
from envs.demos import write_demos
from policies import FlowConfig, load_policy


def test_train_on_suite_demos_and_evaluate(tmp_path):
    data_dir = str(tmp_path / "demos")
    write_demos("reach", 4, None, 0, data_dir)
    flow = FlowConfig(horizon=4, patch_size=16, width=32, depth=1, heads=2, expert_width=16,
                      expert_heads=2, num_steps=2, loss_samples=1)
    cfg = TrainConfig(flow=flow, tasks=("reach",), datasets=(data_dir,), steps=4, batch_size=8,
                      steps_per_call=2, log_every=2, checkpoint_every=4, eval_episodes=2,
                      eval_replan=4)
    run = train_policy(cfg, str(tmp_path / "run"), progress=False)
    with open(os.path.join(run, "metrics.jsonl")) as f:
        rows = [json.loads(ln) for ln in f]
    final = rows[-1]
    assert final["final"] and final["step"] == 4 and final["eval/n_episodes"] == 2
    assert 0.0 <= final["eval/success_rate"] <= 1.0
    policy, params = load_policy(run)  # the exported artifact: parameters only
    _, ckpt_params, loaded = load_checkpoint(run)
    assert loaded.flow.state_dim > 0 and loaded.flow.instruction_len == 16  # filled from the spec
    assert policy.cfg == loaded.flow
    jax.tree.map(np.testing.assert_array_equal, params, ckpt_params)
    import envs

    _, obs = envs.make("reach").reset(jax.random.PRNGKey(0))
    cand = jax.jit(lambda p, o: policy.sample(p, policy.encode(p, o), jax.random.PRNGKey(1), 3))(
        params, obs)
    assert cand.actions.shape == (3, 4, 3) and np.all(np.isfinite(cand.features))
