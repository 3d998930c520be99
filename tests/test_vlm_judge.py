"""The Bradley–Terry judge's transformers backend: prompts and binning (known answers, no torch),
then, with the ``vlm`` extra, a tiny randomly initialised LLaVA-shaped model that the test
builds and saves itself: the torch loss against the JAX one, learning a known order, a fit
through the plugin, save/load, and scoring inside jit and vmap as the harness runs it (the fit
and what stands on it are marked slow)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs
from algos.bradley_terry import BTConfig, pair_losses
from envs.language import VOCAB, tokenize
from experiments.harness import EvalConfig, Setup, evaluate_compiled
from policies import FlowConfig, example_obs, make_policy
from policies.base import Candidates
from verifiers.base import BuildContext
from verifiers.bradley_terry import BradleyTerryConfig
from verifiers.registry import PLUGINS
from verifiers.vlm_judge import (
    VLMJudgeConfig,
    action_bounds,
    discretise,
    prompt_text,
)

KEY = jax.random.PRNGKey(0)


def test_discretise_known_bins_and_clipping():
    low, high = np.array([-1.0, 0.0]), np.array([1.0, 4.0])
    chunk = np.array([[-1.0, 0.0], [0.0, 1.0], [0.999, 3.99], [1.0, 4.0], [-3.0, 9.0]])
    np.testing.assert_array_equal(discretise(chunk, low, high, 4),
                                  [[0, 0], [2, 1], [3, 3], [3, 3], [0, 3]])


def test_action_bounds_are_the_valid_steps_percentiles():
    a = np.zeros((2, 101, 1))
    a[0, :, 0] = np.arange(101)  # 0..100: 1st and 99th percentiles are 1 and 99
    a[1, :, 0] = 1e6  # an invalid chunk's steps do not count
    valid = np.zeros((2, 101), bool)
    valid[0] = True
    low, high = action_bounds(a, valid)
    np.testing.assert_allclose([low[0], high[0]], [1.0, 99.0])


def test_prompt_text_fills_every_slot():
    text = prompt_text(VLMJudgeConfig(state_decimals=1), "<image>",
                       tokenize("reach the red block"), np.array([0.25, -1.0]),
                       np.array([[1, 2], [3, 4]]))
    assert text == ("<image>In: What action should the robot take to reach the red block?\n"
                    "State: 0.2 -1.0\nAction: 1 2 3 4\nOut:")


@pytest.mark.parametrize("kw, match", [
    ({"backend": "torch"}, "backend must be one of"),
    ({"backend": "transformers"}, "needs vlm.model_dir"),
    ({"vlm": {"action_bins": 1}}, "vlm.action_bins"),
    ({"vlm": {"finetune": "lora"}}, "vlm.finetune must be one of"),
    ({"vlm": {"prompt": "{image} {state}"}}, "must contain {instruction}"),
    ({"vlm": {"state_decimals": 9}}, "vlm.state_decimals"),
])
def test_backend_options_are_checked_by_name(kw, match):
    with pytest.raises(ValueError, match=match):
        if "vlm" in kw:
            VLMJudgeConfig(**kw["vlm"])
        else:
            BradleyTerryConfig(**kw)


# ---------------------------------------------------------------------------------------------
# with torch and transformers (the vlm extra)


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    """A LLaVA-shaped model (CLIP vision tower, Llama text model) of a few thousand weights,
    randomly initialised, with a word-level tokenizer over the suite's words, numbers and the
    prompt's words; saved as a local model directory."""
    pytest.importorskip("transformers")
    pytest.importorskip("torch")
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    words = ["<pad>", "<unk>", "<s>", "</s>", "<image>", *VOCAB, *map(str, range(256)),
             *"In What action should the robot take to State Action Out : ? . -".split()]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(dict.fromkeys(words))},
                                     unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                        unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                        extra_special_tokens={"image_token": "<image>"})
    torch.manual_seed(0)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                       max_position_embeddings=512, pad_token_id=0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, image_size=32, patch_size=8)
    model = LlavaForConditionalGeneration(LlavaConfig(
        vision_config=vision, text_config=text, image_seq_length=16,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>")))
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                           crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
        num_additional_image_tokens=1)
    path = str(tmp_path_factory.mktemp("tiny_vlm"))
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def test_torch_loss_and_gradient_equal_the_jax_loss(tiny_vlm):
    import torch

    from verifiers.vlm_judge import torch_pair_losses

    r_w, r_l = np.array([0.3, -1.0, 2.0]), np.array([0.1, 0.5, -0.5])
    e_w, e_l = np.array([0.1, 0.2, 0.0]), np.array([0.6, 0.3, 1.5])
    for alpha in (0.0, 0.1, 2.0):
        want = pair_losses(*map(jnp.asarray, (r_w, r_l, e_w, e_l)), alpha)
        grad = jax.grad(lambda a, b, al: pair_losses(a, b, e_w, e_l, al).sum(), (0, 1))(
            jnp.asarray(r_w), jnp.asarray(r_l), alpha)
        tw, tl = (torch.tensor(x, requires_grad=True) for x in (r_w, r_l))
        got = torch_pair_losses(tw, tl, torch.tensor(e_w), torch.tensor(e_l), alpha)
        got.sum().backward()
        np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-6)
        np.testing.assert_allclose(tw.grad.numpy(), grad[0], rtol=1e-6)
        np.testing.assert_allclose(tl.grad.numpy(), grad[1], rtol=1e-6)


def _obs(n, image: bool, seed=0):
    rng = np.random.default_rng(seed)
    obs = {"state": rng.normal(size=(n, 5)).astype(np.float32),
           "instruction": np.stack([tokenize("reach the red block")] * n)}
    if image:
        obs["image"] = rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)
    return obs


@pytest.mark.parametrize("finetune", ["head", pytest.param("all", marks=pytest.mark.slow)])
def test_the_judge_learns_a_known_order(tiny_vlm, finetune):
    """Winners move up (+0.8 on every step), losers down: the order lives in the action tokens
    alone, so training must take the pairwise accuracy on these pairs from chance to 1."""
    from verifiers.vlm_judge import VLMJudge, train_judge

    cfg = VLMJudgeConfig(model_dir=tiny_vlm, action_bins=8, finetune=finetune)
    judge = VLMJudge(cfg, tiny_vlm, True, -np.ones(2), np.ones(2))
    rng = np.random.default_rng(1)
    P = 16
    pairs = {"state": np.arange(P), "win": 0.8 + 0.1 * rng.normal(size=(P, 3, 2)),
             "lose": -0.8 + 0.1 * rng.normal(size=(P, 3, 2)), "e_w": np.zeros(P),
             "e_l": np.ones(P), "valid": np.ones(P, bool)}
    obs = _obs(P, image=True)
    learner = BTConfig(steps=60, batch_size=8, lr=3e-2 if finetune == "head" else 3e-3,
                       updates_per_call=20)
    history = train_judge(judge, pairs, obs, learner)
    right = judge.scores(obs, pairs["win"]) > judge.scores(obs, pairs["lose"])
    assert right.mean() == 1.0
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]


@pytest.fixture(scope="module")
def fitted(tiny_vlm, tmp_path_factory):
    """A tiny transformers-backend fit through the plugin, on three reach demonstrations."""
    from envs.dataset import load_demos
    from envs.demos import write_demos

    root = tmp_path_factory.mktemp("vlm_fit")
    env = envs.make("reach", image=False, max_steps=12)
    pcfg = FlowConfig(width=16, depth=1, heads=2, expert_width=16, expert_heads=2, num_steps=2,
                      horizon=4).with_spec(env.spec)
    policy = make_policy("flow", pcfg)
    params = policy.init(KEY, example_obs(pcfg))
    write_demos("reach", 3, None, 0, str(root / "demos"))
    config = BradleyTerryConfig(
        samples=4, representatives=3, states=12, heldout=0.34, predictability_samples=0,
        backend="transformers", vlm=VLMJudgeConfig(model_dir=tiny_vlm, score_batch=7),
        learner=BTConfig(steps=4, updates_per_call=2, batch_size=4))
    out = str(root / "fit")
    PLUGINS["bradley_terry"].fit(config, BuildContext(env=env, policy=policy, replan=2), params,
                                 load_demos(str(root / "demos")), KEY, out)
    ctx = BuildContext(env=env, policy=policy, replan=2, fitted_dir=out)
    return env, policy, params, config, ctx


@pytest.mark.slow
def test_fit_writes_the_judge_and_its_heldout_metrics(fitted):
    from core.io import read_json

    *_, ctx = fitted
    info = read_json(os.path.join(ctx.fitted_dir, "fit_info.json"))
    assert len(info["history"]) == 2 and info["heldout"]["pairs"] > 0
    assert 0.0 <= info["heldout"]["accuracy"] <= 1.0
    assert sorted(os.listdir(os.path.join(ctx.fitted_dir, "vlm_judge"))) == ["head.pt",
                                                                             "judge.json"]


@pytest.mark.slow
def test_built_judge_scores_in_jit_and_vmap_as_on_the_host(fitted):
    """The verifier the plugin builds scores through a host callback: inside jit, and vmapped
    over a batch of observations (as the harness runs it), it must give the judge's own scores;
    a second build from the same fit gives the same scores."""
    env, policy, params, config, ctx = fitted
    v = PLUGINS["bradley_terry"].build(config, ctx)
    assert v.name == "bradley_terry" and v.state is None
    obs = jax.vmap(lambda k: env.reset(k)[1])(jax.random.split(KEY, 3))
    chunks = jax.random.normal(KEY, (3, 5, policy.horizon, env.spec.action_dim))
    cands = Candidates(actions=chunks, features=jnp.zeros((3, 5, 1)))
    batched = jax.jit(jax.vmap(lambda o, c: v.score(None, o, c, KEY)))(obs, cands)
    host = v.judge.scores({k: np.repeat(np.asarray(obs[k]), 5, 0) for k in ("state",
                                                                             "instruction")},
                          np.asarray(chunks).reshape(15, *chunks.shape[2:]))
    assert batched.shape == (3, 5) and batched.dtype == jnp.float32
    np.testing.assert_allclose(batched.reshape(-1), host, rtol=1e-5, atol=1e-6)
    one = jax.jit(lambda o, c: v.score(None, o, c, KEY))(
        jax.tree.map(lambda x: x[1], obs), jax.tree.map(lambda x: x[1], cands))
    np.testing.assert_allclose(one, batched[1], rtol=1e-5, atol=1e-6)
    again = PLUGINS["bradley_terry"].build(config, ctx)
    np.testing.assert_allclose(again.judge.scores(
        {k: np.asarray(obs[k])[:1].repeat(5, 0) for k in ("state", "instruction")},
        np.asarray(chunks[0])), batched[0], rtol=1e-5, atol=1e-6)
    stand_in = PLUGINS["bradley_terry"].init(config, ctx, KEY)
    assert jax.jit(lambda o, c: stand_in.score(None, o, c, KEY))(
        jax.tree.map(lambda x: x[0], obs), jax.tree.map(lambda x: x[0], cands)).shape == (5,)


@pytest.mark.slow
def test_the_compiled_harness_runs_with_the_vlm_judge(fitted):
    """Episodes vmapped and scanned in one compiled call, the judge called back per decision."""
    from envs import experts
    from verifiers.registry import make_verifier

    env, policy, params, config, ctx = fitted
    v = PLUGINS["bradley_terry"].build(config, ctx)
    cfg = EvalConfig(M=3, episodes=2, replan=4, timing_decisions=0)
    oracle = make_verifier("oracle_sim", BuildContext(env=env, replan=cfg.replan))
    rec = evaluate_compiled(Setup(env=env, policy=policy, verifier=v, cfg=cfg, oracle=oracle,
                                  expert=experts), params, v.state)
    assert rec["success"].shape == (2,) and np.all(np.isfinite(rec["progress"]))
    chosen = rec["decisions/score"]  # the judge's score of each executed candidate
    assert np.all(np.isfinite(chosen)) and np.unique(chosen).size > 1


def test_a_model_dir_that_is_not_there_is_named(tmp_path):
    pytest.importorskip("transformers")
    from verifiers.vlm_judge import VLMJudge

    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="vlm.model_dir .*nowhere"):
        VLMJudge(VLMJudgeConfig(model_dir=missing), missing, False, [-1.0], [1.0])

