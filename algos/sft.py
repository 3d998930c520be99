"""Supervised fine-tuning (behaviour cloning) of a base policy on demonstration chunks.

AdamW with linear warm-up and cosine decay, global-norm clipping, optional EMA of the params.
Several updates run per host call inside one jitted ``lax.scan``. The minibatch at step ``s`` is
a pure function of (data key, s), so a run resumed from a checkpoint reproduces the
uninterrupted run exactly. Checkpoints (Orbax) hold the whole train state.

Run directory:
    config.json      the resolved TrainConfig (policy sizes filled in)
    metrics.jsonl    one row per log point / evaluation
    ckpt/<step>/     Orbax checkpoints, the last ``keep_last`` kept
    policy/          the finished policy (``policies.load_policy``), exported at the last step

The chunk data live in ``algos.sft_data``, the run directory's files in ``algos.sft_run``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from dataclasses import dataclass, field
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from algos.sft_data import (  # noqa: F401  heldout_episodes: part of this module's API
    check_data_fits,
    dataset_paths,
    default_dataset_path,
    heldout_episodes,
    heldout_loss_fn,
    load_data,
    split_heldout,
)
from algos.sft_run import check_run_dir, has_final, log_row, truncate_metrics
from core.checkpoint import Checkpointer
from core.config import ConfigError, from_dict, to_dict
from core.io import BadFileError, read_json_object, write_text
from envs.rollout import decision_keys, episode_keys, num_decisions, unroll
from policies import ARConfig, FlowConfig, example_obs, make_policy, save_policy
from policies.registry import POLICY_FILE


@dataclass(frozen=True)
class TrainConfig:
    policy: Literal["flow", "autoregressive"] = "flow"
    """which base policy to train"""
    flow: FlowConfig = field(default_factory=FlowConfig)
    """flow policy config (used when policy = flow)"""
    autoregressive: ARConfig = field(default_factory=ARConfig)
    """token policy config (used when policy = autoregressive)"""
    suite: str = "tabletop"
    """the env suite the policy acts in (``envs.get_suite``): its spec sizes the policy; the
    evaluation during training needs a pure-JAX suite and is skipped on a host-stepped one"""
    tasks: tuple[str, ...] = ("pick_place",)
    """tasks whose datasets are combined (the policy conditions on the instruction)"""
    datasets: tuple[str, ...] = ()
    """one demonstration path per task"""
    variant: str = "nominal"
    """env variant used for evaluation"""
    normalize: bool = False
    """standardise states and actions with the training chunks' mean and std (flow policy; the
    statistics are stored in its config): for simulator states in mixed units (positions,
    joint velocities) and actions whose spread is far from the flow's unit noise. The built-in
    suite's states and actions are already in [0, 1] and [-1, 1]"""
    steps: int = 4000
    """updates (about 5.4 epochs of the default dataset): the default pick_place policy's
    held-out chunk loss is at its minimum by then and rises slowly after (over-fitting)"""
    batch_size: int = 64
    """64 is the fastest per sample on 2 CPU cores (128 is slower per sample: cache-bound)"""
    lr: float = 1e-3
    warmup: int = 100
    cosine: bool = True
    """cosine decay to final_lr_ratio * lr after warm-up (else constant)"""
    final_lr_ratio: float = 0.05
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    ema_decay: float = 0.0
    """EMA of params (0 = off); evaluation and load_policy use the EMA when on"""
    steps_per_call: int = 25
    """updates per jitted host call (lax.scan)"""
    log_every: int = 50
    heldout: float = 0.05
    """fraction of episodes held out of training (chosen by a hash of the episode index)"""
    heldout_every: int = 500
    """log the held-out chunk loss every N steps (fixed flow times and noise, so it is
    comparable across steps and runs; 0 = only at the end)"""
    eval_every: int = 0
    """evaluate every N steps (0 = only at the end)"""
    eval_episodes: int = 32
    eval_replan: int = 4
    """actions executed per chunk before replanning during evaluation"""
    eval_seed: int = 1000
    """evaluation episodes start from the harness's indexed initial states of this seed (the
    harness's eval.seed), so the in-training success is the harness's M = 1 figure"""
    checkpoint_every: int = 500
    keep_last: int = 2
    seed: int = 0

    @property
    def policy_config(self):
        return self.flow if self.policy == "flow" else self.autoregressive

    def validate(self) -> None:
        if self.policy not in ("flow", "autoregressive"):
            raise ValueError(f"TrainConfig.policy must be 'flow' or 'autoregressive', "
                             f"got {self.policy!r}")
        if not self.tasks:
            raise ValueError("TrainConfig.tasks must name at least one task")
        if self.datasets and len(self.datasets) != len(self.tasks):
            raise ValueError(f"TrainConfig.datasets needs one path per task "
                             f"({len(self.tasks)}), got {len(self.datasets)}")
        for name in ("steps", "batch_size", "steps_per_call", "log_every", "checkpoint_every",
                     "keep_last", "eval_replan"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TrainConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.eval_episodes < 0 or self.eval_every < 0 or self.heldout_every < 0:
            raise ValueError("TrainConfig.eval_episodes, eval_every and heldout_every must be "
                             ">= 0")
        if not 0.0 <= self.heldout < 0.5:
            raise ValueError(f"TrainConfig.heldout must be in [0, 0.5), got {self.heldout}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"TrainConfig.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.normalize and self.policy != "flow":
            raise ValueError("TrainConfig.normalize is for the flow policy (the "
                             "autoregressive policy bins actions in [-1, 1])")
        if self.eval_replan > self.policy_config.horizon:
            raise ValueError(f"TrainConfig.eval_replan ({self.eval_replan}) must be <= the "
                             f"policy horizon ({self.policy_config.horizon})")


def default_train_config(task: str, policy: str = "flow") -> TrainConfig:
    """Defaults sized to train on 2 CPU cores in about ten minutes."""
    return TrainConfig(policy=policy, tasks=(task,), datasets=(default_dataset_path(task),))


class TrainState(struct.PyTreeNode):
    params: dict
    opt_state: optax.OptState
    ema: dict  # {} when EMA is off
    step: jax.Array  # i32 []
    key: jax.Array  # data/loss key; the minibatch at step s uses fold_in(key, s)


def make_schedule(cfg: TrainConfig) -> optax.Schedule:
    if cfg.cosine:
        return optax.warmup_cosine_decay_schedule(
            0.0, cfg.lr, max(cfg.warmup, 1), max(cfg.steps, cfg.warmup + 1),
            end_value=cfg.lr * cfg.final_lr_ratio)
    return optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup, 1))


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                       optax.adamw(make_schedule(cfg), weight_decay=cfg.weight_decay))


def resolve_config(cfg: TrainConfig, spec) -> TrainConfig:
    """Fills policy size fields left at 0 from the env spec."""
    return dataclasses.replace(cfg, flow=cfg.flow.with_spec(spec),
                               autoregressive=cfg.autoregressive.with_spec(spec))


def init_state(policy, cfg: TrainConfig, tx, init_params=None) -> TrainState:
    """A fresh training state; ``init_params`` (fine-tuning) replace the random init."""
    key = jax.random.PRNGKey(cfg.seed)
    k_init, k_data = jax.random.split(key)
    # a copy: training donates its state's buffers, and the caller keeps using init_params
    params = policy.init(k_init, example_obs(policy.cfg)) if init_params is None else \
        jax.tree.map(lambda x: jnp.array(x, copy=True), init_params)
    ema = jax.tree.map(jnp.copy, params) if cfg.ema_decay > 0 else {}  # no shared buffers
    return TrainState(params, tx.init(params), ema, jnp.zeros((), jnp.int32), k_data)


# fields that do not change the compiled update; reset so runs that differ only in them
# (seeds, logging, evaluation) share one compilation within a process
_HOST_FIELDS = dict(seed=0, log_every=1, eval_every=0, eval_episodes=0, eval_replan=1, eval_seed=0,
                    heldout=0.0, heldout_every=0,
                    checkpoint_every=1, keep_last=1, steps_per_call=1, tasks=("",), datasets=(),
                    variant="")


def make_update(policy, cfg: TrainConfig, tx=None):
    """A jitted ``update(state, data, n) -> (state, info)`` running n steps in a lax.scan."""
    del tx  # rebuilt from cfg so the compiled function can be shared
    return _make_update(policy, dataclasses.replace(cfg, **_HOST_FIELDS))


@functools.lru_cache(maxsize=8)
def _make_update(policy, cfg: TrainConfig):
    tx = make_optimizer(cfg)

    def one(state: TrainState, data):
        k_idx, k_loss = jax.random.split(jax.random.fold_in(state.key, state.step))
        n = data["actions"].shape[0]
        idx = jax.random.randint(k_idx, (cfg.batch_size,), 0, n)
        batch = jax.tree.map(lambda x: x[idx], data)
        (loss, info), grads = jax.value_and_grad(policy.loss, has_aux=True)(
            state.params, batch, k_loss)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema
        if cfg.ema_decay > 0:
            d = cfg.ema_decay
            ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p, state.ema, params)
        info = {**info, "grad_norm": optax.tree.norm(grads)}
        return state.replace(params=params, opt_state=opt_state, ema=ema,
                             step=state.step + 1), info

    def update(state, data, n):
        state, infos = jax.lax.scan(lambda s, _: one(s, data), state, None, length=n)
        # index in this call of the first step whose loss (or, for the last step, whose
        # updated params) is not finite; -1 when all are
        bad = ~jnp.isfinite(infos["loss"])
        params_ok = jnp.all(jnp.stack([jnp.isfinite(x).all()
                                       for x in jax.tree.leaves(state.params)]))
        first_bad = jnp.where(bad.any(), jnp.argmax(bad), jnp.where(params_ok, -1, n - 1))
        return state, {**jax.tree.map(jnp.mean, infos), "first_nonfinite": first_bad}

    return jax.jit(update, static_argnames="n", donate_argnums=0)


def rollout_success(env, policy, params, seed: int, episodes: int, replan: int) -> dict:
    """M = 1 closed-loop success and final progress over episodes 0..episodes-1 of ``seed``:
    the harness's initial states and decision keys (``envs.rollout``), vmapped over episodes."""

    def decide(state, obs, k_episode, k):
        k_sample = decision_keys(k)[0]
        return policy.sample(params, policy.encode(params, obs), k_sample, 1).actions[0], {}

    decisions = num_decisions(env.spec.max_steps, replan)
    episode = lambda key: unroll(env, key, decide, decisions, replan)[1:3]
    success, progress = jax.vmap(episode)(episode_keys(seed, episodes))
    return {"success_rate": success.mean(), "progress": progress.mean()}


class NonFiniteLossError(ValueError):
    """Training diverged: a loss or the updated params are not finite."""


def _raise_if_nonfinite(info: dict, step: int, ckpt: Checkpointer, cfg: TrainConfig) -> None:
    """Stops a diverged run (closing its checkpointer) before it logs or checkpoints anything of
    the failing call, so its last checkpoint stays the last good one."""
    k = int(info.pop("first_nonfinite"))
    if k < 0:
        return
    last = ckpt.latest_step()
    ckpt.close()
    kept = (f"the last good checkpoint is step {last} in {ckpt.directory}" if last is not None
            else f"no checkpoint was written to {ckpt.directory}")
    raise NonFiniteLossError(f"training loss is not finite at step {step + k + 1}; {kept} "
                             f"(lower lr={cfg.lr:g} or grad_clip={cfg.grad_clip:g}, or check "
                             "the data)")


def _boundaries(cfg: TrainConfig, step: int) -> int:
    """Next step at which the host must act; depends on config only, so resumes stay exact."""
    periods = [cfg.steps_per_call, cfg.log_every, cfg.checkpoint_every]
    periods += [p for p in (cfg.eval_every, cfg.heldout_every) if p > 0]
    return min([cfg.steps] + [(step // p + 1) * p for p in periods])


def train_policy(cfg: TrainConfig, run_dir: str, *, data: dict | None = None, env=None,
                 stop_after: int | None = None, progress: bool = True,
                 init_params=None) -> str:
    """Trains (or resumes) the policy of ``cfg`` in ``run_dir``; returns ``run_dir``.

    ``data`` (chunk arrays as ``load_data`` returns) and ``env`` (for evaluation; None with
    ``eval_episodes`` still set builds ``envs.make(tasks[0], variant)``) may be given directly.
    ``init_params`` (a trained policy's, same config) start the run instead of a random init:
    fine-tuning, as distillation does.
    ``stop_after`` stops once that step is reached (as an interruption would).
    """
    cfg.validate()
    pc = cfg.policy_config
    unsized = min(pc.state_dim, pc.instruction_len, pc.vocab_size, pc.num_tasks) == 0
    import envs

    suite = envs.get_suite(cfg.suite)
    if env is None and (cfg.eval_episodes > 0 or unsized):
        env = suite.make(cfg.tasks[0], cfg.variant, image=pc.image)
    evaluating = cfg.eval_episodes > 0 and env is not None and suite.jittable
    if env is not None:
        cfg = resolve_config(cfg, env.spec)
    where = "the training data" if data is not None else f"datasets {list(dataset_paths(cfg))}"
    if data is None:
        data = load_data(cfg)
    data, heldout = split_heldout(dict(data))
    if cfg.normalize and not cfg.flow.state_mean:  # statistics given in the config are kept
        valid = np.asarray(data["valid"], bool)
        cfg = dataclasses.replace(cfg, flow=cfg.flow.with_statistics(
            data["obs"]["state"], np.asarray(data["actions"])[valid]))
    check_run_dir(run_dir, to_dict(cfg))
    policy = make_policy(cfg.policy, cfg.policy_config)
    tx = make_optimizer(cfg)
    state = init_state(policy, cfg, tx, init_params)
    check_data_fits(policy, state.params, data, where)
    data = jax.tree.map(jnp.asarray, data)
    num_samples = int(data["actions"].shape[0])

    # Inputs are loaded and checked: only now is the run directory written.
    os.makedirs(run_dir, exist_ok=True)
    write_text(os.path.join(run_dir, "config.json"), json.dumps(to_dict(cfg), indent=2))
    ckpt = Checkpointer(os.path.join(run_dir, "ckpt"), cfg.keep_last)
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    if ckpt.latest_step() is None and os.path.exists(metrics_path):
        os.remove(metrics_path)  # rows of a start that failed before its first checkpoint
    if ckpt.latest_step() is not None:
        state = ckpt.restore(state, remedy="delete that step's directory to resume from the "
                             "checkpoint before it, or use a new run directory")
        truncate_metrics(metrics_path, int(state.step))
        if int(state.step) == cfg.steps and has_final(metrics_path):
            ckpt.close()
            _export(run_dir, policy, cfg, state)
            return run_dir  # already finished
    update = make_update(policy, cfg, tx)
    heldout_loss = heldout_loss_fn(policy) if heldout is not None else None
    evaluate = jax.jit(lambda p: rollout_success(env, policy, p, cfg.eval_seed,
                                                 cfg.eval_episodes, cfg.eval_replan))

    def run_eval(step):
        t0 = time.perf_counter()
        res = jax.device_get(evaluate(deployed_params(cfg, state)))
        row = {"step": step, "eval/success_rate": float(res["success_rate"]),
               "eval/progress": float(res["progress"]), "eval/n_episodes": cfg.eval_episodes,
               "time/eval_s": time.perf_counter() - t0}
        log_row(metrics_path, row)
        return row

    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("sft {task.fields[name]}"), BarColumn(),
                   TextColumn("{task.completed}/{task.total}"),
                   TextColumn("loss {task.fields[loss]:.4f}"),
                   TextColumn("{task.fields[sps]:.0f} samples/s"), TimeRemainingColumn(),
                   disable=not progress)
    step = int(state.step)
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    with bar:
        task = bar.add_task("train", total=cfg.steps, completed=step, name=cfg.policy,
                            loss=float("nan"), sps=0.0)
        t_log, s_log, compile_s = time.perf_counter(), step, None
        while step < end:
            n = min(_boundaries(cfg, step), end) - step
            t0 = time.perf_counter()
            state, info = update(state, data, n)
            _raise_if_nonfinite(info, step, ckpt, cfg)
            step += n
            if compile_s is None:
                jax.block_until_ready(state.step)
                compile_s = time.perf_counter() - t0
            if step % cfg.log_every == 0 or step == cfg.steps:
                info = {k: float(v) for k, v in jax.device_get(info).items()}
                now = time.perf_counter()
                sps = (step - s_log) * cfg.batch_size / max(now - t_log, 1e-9)
                t_log, s_log = now, step
                log_row(metrics_path, {"step": step, **{f"train/{k}": v for k, v in info.items()},
                                    "train/lr": float(make_schedule(cfg)(step)), "time/sps": sps,
                                    "time/compile_s": compile_s, "data/samples": num_samples})
                bar.update(task, completed=step, loss=info["loss"], sps=sps)
            if heldout_loss is not None and (step == cfg.steps or (
                    cfg.heldout_every > 0 and step % cfg.heldout_every == 0)):
                loss = heldout_loss(deployed_params(cfg, state), heldout)
                log_row(metrics_path, {"step": step, "heldout/loss": float(loss),
                                    "heldout/chunks": int(heldout["actions"].shape[0])})
            if evaluating and cfg.eval_every > 0 and step % cfg.eval_every == 0 \
                    and step < cfg.steps:
                run_eval(step)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                ckpt.save(step, state)
    ckpt.close()
    if step == cfg.steps and evaluating:
        row = run_eval(step)
        log_row(metrics_path, {"step": step, "final": True, **{k: v for k, v in row.items()
                                                              if k != "step"}})
    if step == cfg.steps:
        _export(run_dir, policy, cfg, state)
    return run_dir


def deployed_params(cfg: TrainConfig, state: TrainState):
    """The parameters that are evaluated and exported: the EMA when it is on."""
    return state.ema if cfg.ema_decay > 0 else state.params


def _export(run_dir: str, policy, cfg: TrainConfig, state: TrainState) -> None:
    """The finished policy as a policy artifact (``run_dir/policy``), what evaluation loads."""
    if not os.path.isfile(os.path.join(run_dir, "policy", POLICY_FILE)):
        save_policy(os.path.join(run_dir, "policy"), policy, deployed_params(cfg, state))


def load_config(run_dir: str) -> TrainConfig:
    """The TrainConfig of a run directory; errors name its config.json."""
    path = os.path.join(run_dir, "config.json")
    data = read_json_object(path, f"it is written by `steerlab train-policy --out {run_dir}`")
    try:
        return from_dict(TrainConfig, data)
    except ConfigError as e:
        raise BadFileError(f"{path}: {e}") from None


def load_checkpoint(run_dir: str, step: int | None = None):
    """(policy, params, cfg) from a training checkpoint (params are the EMA when EMA was on).
    Readers of a finished policy use ``policies.load_policy`` on the exported artifact."""
    cfg = load_config(run_dir)
    policy = make_policy(cfg.policy, cfg.policy_config)
    tx = make_optimizer(cfg)
    target = jax.eval_shape(lambda: init_state(policy, cfg, tx))
    ckpt = Checkpointer(os.path.join(run_dir, "ckpt"), cfg.keep_last)
    try:
        state = ckpt.restore(target, step, remedy="train the run again")
    finally:
        ckpt.close()
    return policy, deployed_params(cfg, state), cfg
