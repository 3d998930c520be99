"""Writing demonstration datasets: expert mixtures rolled out in the tabletop suite, stored in
the layout ``envs.dataset`` describes and reads back (``load_demos``).

The expert mode is drawn per *segment* of ``segment`` steps (default 4, the harness's replan
length), so at every decision state the data is the mixture ``mix`` (``segment=0`` draws one
mode per episode instead, which lets slow failure modes dwell and outweigh pi* per step).
Decision steps are the first step of each segment; ``mode_label`` holds, at decision steps, the
mode classifier's (tie-splitting) label of the chunk executed from there, the same label the
harness gives a policy's executed chunks, so the two can be compared bin by bin.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from envs.dataset import OBS_KEYS, save_dataset
from envs.experts import ALL_MODES, MODES, classify_chunk, expert_chunk, rollout, segment_key
from envs.mixture import (
    DEFAULT_MIX,
    bin_names,
    check_task_variant,
    label_accuracy,
    mode_shares_by_bin,
    premise_check,
    progress_bins,
    time_limit,
    validate_mix,
)
from envs.tabletop import make

DEFAULT_SEGMENT = 4
_BATCH = 64  # episodes per compiled rollout call; bounds memory when images are on


def labelled_rollout(env, key: jax.Array, modes: jax.Array, segment: int, h: int):
    """``experts.rollout`` plus, at each decision step (the first of a segment), the mode
    classifier's label [n_modes] of the h-step chunk executed from there (zeros elsewhere).

    Within a segment the expert's mode and latents are fixed, so that chunk is the expert's own
    ``expert_chunk`` from the decision state; the label is computed from the states the scan
    visits without storing them.
    """
    traj = rollout(env, key, modes, segment)
    k_reset, k_expert = jax.random.split(key)
    state, _ = env.reset(k_reset)
    every = segment or h
    n_modes = len(MODES[env.task])

    def body(s, xs):
        action, mode = xs
        label = classify_chunk(env, s, expert_chunk(env, s, mode, segment_key(k_expert, s.t,
                                                                              segment), h))
        at_decision = (s.t % every) == 0
        out = (jnp.where(at_decision, label, jnp.zeros(n_modes)), at_decision, s.progress)
        return env.step_state(s, action), out

    _, (label, decision, progress) = jax.lax.scan(body, state, (traj["action"], traj["mode"]))
    return {**traj, "mode_label": label, "decision": decision, "state_progress": progress}


def pi_star_rollout(env, key: jax.Array, modes: jax.Array, segment: int, H: int):
    """``experts.rollout`` plus, at every step, the H-step chunk pi* (mode 0) would take from
    that state: ``pi_star`` f32 [T, H, A]. The reference a judge can be trained toward."""
    traj = rollout(env, key, modes, segment)
    k_reset, k_expert = jax.random.split(key)
    state, _ = env.reset(k_reset)

    def body(s, action):
        chunk = expert_chunk(env, s, 0, segment_key(k_expert, s.t, segment), H)
        return env.step_state(s, action), chunk

    _, pi_star = jax.lax.scan(body, state, traj["action"])
    return {**traj, "pi_star": pi_star}


@functools.cache
def _rollout_fn(task: str, variant: str, image: bool, segment: int, h: int, max_steps: int,
                pi_star: bool = False):
    env = make(task, variant, image=image, max_steps=max_steps)
    one = pi_star_rollout if pi_star else labelled_rollout
    return jax.jit(jax.vmap(lambda k, m: one(env, k, m, segment, h)))


def _collect(task: str, variant: str, image: bool, keys: np.ndarray, modes: np.ndarray,
             segment: int, max_steps: int, pi_star_horizon: int = 0):
    """Rolls the episodes out in batches -> the trajectories [E, T, ...]; with
    ``pi_star_horizon`` H > 0 they hold pi*'s H-step chunk at every step instead of labels."""
    h = pi_star_horizon or segment or DEFAULT_SEGMENT
    fn = _rollout_fn(task, variant, image, segment, h, max_steps, pi_star_horizon > 0)
    parts = []
    for i in range(0, len(modes), _BATCH):
        k = keys[i : i + _BATCH]
        m = modes[i : i + _BATCH]
        pad = _BATCH - len(m)  # pad the last batch so only one shape is compiled
        k = np.concatenate([k, np.repeat(k[-1:], pad, 0)])
        m = np.concatenate([m, np.repeat(m[-1:], pad, 0)])
        traj = jax.device_get(fn(jnp.asarray(k), jnp.asarray(m)))
        parts.append(jax.tree.map(lambda x, n=_BATCH - pad: x[:n], traj))
    return jax.tree.map(lambda *xs: np.concatenate(xs, 0), *parts)  # [E, T, ...]


def _recorded(valid: np.ndarray, action: np.ndarray) -> np.ndarray:
    """The steps a demonstrator records: [E, T] bool.

    Recording stops once the expert stands still for good (a sloppy release, a wrong block
    put down): those idle frames would otherwise fill the dataset with failing modes' no-op
    actions and outweigh pi*'s steps at every state. One idle step is kept as the end.
    """
    moving = (np.abs(action[..., :2]).max(-1) > 1e-6) & valid
    T = valid.shape[1]
    last = np.where(moving.any(1), T - 1 - np.argmax(moving[:, ::-1], axis=1), 0)
    return valid & (np.arange(T)[None, :] <= last[:, None] + 1)


def _draws(task: str, variant: str, mix, seed: int, episodes: int, segment: int,
           max_steps: int = 0):
    """Everything random about a dataset, from its seed -> (time limit T: ``max_steps``, else
    the one a named mixture sets, else the task's; the validated mix; modes i32 [E, S] per
    segment; episode keys [E, 2])."""
    T = max_steps or time_limit(task, mix) or make(task, variant).max_steps
    mix = validate_mix(task, DEFAULT_MIX if mix is None else mix)
    if not isinstance(episodes, int) or episodes < 1:
        raise ValueError(f"episodes: must be a positive int, got {episodes!r}")
    if not isinstance(segment, int) or segment < 0:
        raise ValueError(f"segment: must be an int >= 0 (0 = one mode per episode), "
                         f"got {segment!r}")
    n_segments = -(-T // segment) if segment else 1
    rng = np.random.default_rng(seed)
    names = list(mix)
    drawn = rng.choice(len(names), size=(episodes, n_segments),
                       p=np.array([mix[n] for n in names]))
    modes = np.array([ALL_MODES.index(n) for n in names], np.int32)[drawn]  # [E, S]
    keys = np.asarray(jax.random.split(jax.random.PRNGKey(seed), episodes))
    return T, mix, modes, keys


def pi_star_chunks(demos, H: int) -> np.ndarray:
    """pi*'s H-step chunk from the state of every step of a dataset written by ``write_demos``
    -> f32 [N, H, A], row-aligned with ``demos.steps``. The dataset stores no simulator states,
    so its episodes are rolled out again from the manifest (seed, mix, segment, episodes: a
    dataset is a function of them); a replay whose states or actions differ from the stored
    steps is an error, never a silent misalignment."""
    m = demos.manifest
    try:
        task, variant, seed, segment = m["task"], m["variant"], m["seed"], m["segment"]
        T, _, modes, keys = _draws(task, variant, m["mix"], seed, m["counts"]["episodes"],
                                   segment, m["max_steps"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"pi* chunks: the dataset's manifest cannot be replayed ({e!r}); "
                         "write the dataset again with `steerlab demos`") from e
    traj = _collect(task, variant, False, keys, modes, segment, T, pi_star_horizon=H)
    valid = _recorded(traj["valid"], traj["action"])
    same = (np.array_equal(traj["obs"]["state"][valid], demos.steps["state"])
            and np.array_equal(traj["action"][valid], demos.steps["action"]))
    if not same:
        raise ValueError("pi* chunks: replaying the dataset from its manifest does not give its "
                         "stored steps (written by another version of the suite?); write the "
                         "dataset again with `steerlab demos`")
    return np.ascontiguousarray(traj["pi_star"][valid], np.float32)


def write_demos(
    task: str,
    episodes: int,
    mix: dict[str, float] | str | None,
    seed: int,
    out_dir: str,
    variant: str = "nominal",
    image: bool = True,
    overwrite: bool = False,
    segment: int = DEFAULT_SEGMENT,
) -> dict:
    """Roll out experts (a mode per segment of ``segment`` steps drawn from ``mix``, a name in
    ``MIXTURES`` or 'mode=weight,...') and write a dataset -> manifest.

    The directory is written to a temporary sibling and renamed into place, so an error never
    leaves a partial dataset behind.
    """
    check_task_variant(task, variant)
    T, mix, modes, keys = _draws(task, variant, mix, seed, episodes, segment)
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise ValueError(f"out_dir: {out_dir} exists; give another --out, or delete it to "
                         "write it again (overwrite=True from Python)")
    traj = _collect(task, variant, image, keys, modes, segment, T)

    ep_success = (traj["success"] & traj["valid"]).any(1)
    valid = _recorded(traj["valid"], traj["action"])  # [E, T]
    lengths = valid.sum(1).astype(np.int32)
    flat = lambda x: x[valid]  # keeps episode order, drops steps after done
    steps = {k: flat(traj["obs"][k]) for k in OBS_KEYS if k in traj["obs"]}
    for k in ("action", "mode", "reward", "done", "success", "progress", "decision",
              "mode_label"):
        steps[k] = flat(traj[k])
    steps["episode"] = flat(np.broadcast_to(np.arange(episodes)[:, None], valid.shape))
    steps["t"] = flat(np.broadcast_to(np.arange(T)[None, :], valid.shape))
    wrong = (traj["wrong_block"] & traj["valid"]).any(1)
    eps = {"mode": modes[:, 0] if not segment else np.full(episodes, -1, np.int32),
           "length": lengths, "success": ep_success.astype(bool), "wrong_block": wrong}

    task_modes = MODES[task]
    at = steps["decision"]
    bins = progress_bins(flat(traj["state_progress"])[at])
    true_shares, counts = mode_shares_by_bin(bins, np.eye(len(task_modes))[steps["mode"][at]])
    label_shares, _ = mode_shares_by_bin(bins, steps["mode_label"][at])
    manifest = {
        "task": task,
        "variant": variant,
        "mix": mix,
        "segment": segment,
        "max_steps": int(T),
        "seed": int(seed),
        "image": bool(image),
        "modes": list(ALL_MODES),
        "counts": {
            "episodes": int(episodes),
            "steps": int(lengths.sum()),
            "successes": int(ep_success.sum()),
        },
        "success_rate": float(ep_success.mean()),
        "wrong_block_rate": float(wrong.mean()),
        "mode_shares": {
            "modes": list(task_modes),
            "bins": bin_names(),
            "decisions": counts.tolist(),
            "true": true_shares.tolist(),
            "classified": label_shares.tolist(),
        },
        "label_accuracy": label_accuracy(steps["mode"][at], steps["mode_label"][at], task_modes),
        "premise": premise_check(true_shares, counts),
    }

    return save_dataset(out_dir, steps, eps, manifest)
