"""SFT data: demonstration chunks of every task's dataset, the fixed held-out split, the held-out
loss, and the check that the data fit the policy before a run directory is written."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np


def default_dataset_path(task: str) -> str:
    return os.path.join("data", "demos", task)


def dataset_paths(cfg) -> tuple[str, ...]:
    """The datasets a TrainConfig trains on (``datasets``, else the tasks' default paths)."""
    return cfg.datasets or tuple(default_dataset_path(t) for t in cfg.tasks)


def load_data(cfg) -> dict:
    """Concatenated chunk arrays of all tasks' datasets (``chunk_data``)."""
    from envs.dataset import load_demos

    paths = dataset_paths(cfg)
    return chunk_data(cfg, [load_demos(p) for p in paths], paths)


def chunk_data(cfg, datasets: list, names: list[str] | tuple[str, ...]) -> dict:
    """Loaded datasets (``envs.dataset.Dataset``, named for errors) -> their concatenated chunk
    arrays: obs, actions [N, H, A], valid [N, H], and heldout bool [N] (the chunk's episode is
    held out, see ``heldout_episodes``)."""
    h = cfg.policy_config.horizon
    parts = [d.chunks(h) for d in datasets]
    keys = ["state", "instruction", "task_id"] + (["image"] if cfg.policy_config.image else [])
    for p, part in zip(names, parts, strict=True):
        absent = [k for k in keys if k not in part["obs"]]
        if absent:
            raise ValueError(f"dataset {p}: has no {absent} for the policy (image=true needs a "
                             "dataset written with renders)")
    obs = {k: np.concatenate([np.asarray(p["obs"][k]) for p in parts]) for k in keys}
    heldout = [heldout_episodes(np.asarray(p["episode"]), cfg.heldout) for p in parts]
    return {"obs": obs,
            "actions": np.concatenate([np.asarray(p["actions"], np.float32) for p in parts]),
            "valid": np.concatenate([np.asarray(p["valid"], bool) for p in parts]),
            "heldout": np.concatenate(heldout)}


def heldout_episodes(episode: np.ndarray, fraction: float) -> np.ndarray:
    """bool [N]: whether each episode index is held out; a fixed hash of the index, so the split
    does not move when datasets grow or the seed changes."""
    h = (np.asarray(episode, np.uint64) * np.uint64(2654435761)) % np.uint64(2**32)
    return h < np.uint64(fraction * 2**32)


def split_heldout(data: dict, max_heldout: int = 4096) -> tuple[dict, dict | None]:
    """(training chunks, at most ``max_heldout`` held-out chunks or None)."""
    mask = np.asarray(data.pop("heldout", np.zeros(len(data["actions"]), bool)))
    take = lambda m: jax.tree.map(lambda x: np.asarray(x)[m], data)
    held = np.flatnonzero(mask)[:max_heldout]
    return take(~mask), (take(held) if len(held) else None)


def check_data_fits(policy, params, data: dict, where: str) -> None:
    """Traces the loss on one chunk (no compute), so data whose shapes the policy cannot take
    fail before anything is written; ``where`` names the data in the error."""
    if int(np.shape(data["actions"])[0]) == 0:
        raise ValueError(f"{where}: no training chunks (every episode is held out or the "
                         "dataset is empty)")
    one = jax.tree.map(lambda x: jax.ShapeDtypeStruct((1, *np.shape(x)[1:]), x.dtype), data)
    try:
        jax.eval_shape(policy.loss, params, one, jax.random.PRNGKey(0))
    except (TypeError, ValueError) as e:
        shapes = {f"obs.{k}": list(np.shape(v)[1:]) for k, v in data["obs"].items()}
        shapes["actions"] = list(np.shape(data["actions"])[1:])
        raise ValueError(f"{where}: the data do not fit the policy config (per-chunk shapes "
                         f"{shapes}): {' '.join(str(e).split())[:200]}") from None


@functools.lru_cache(maxsize=8)
def heldout_loss_fn(policy, batch: int = 512):
    """A jitted ``loss(params, chunks) -> mean flow loss`` with fixed (t, noise) draws per
    chunk index, so values are comparable between steps and between runs."""

    def one(params, b, i):
        return policy.loss(params, b, jax.random.fold_in(jax.random.PRNGKey(0), i))[0]

    @jax.jit
    def loss(params, chunks):
        n = chunks["actions"].shape[0] // batch * batch
        parts = jax.tree.map(lambda x: x[:n].reshape(-1, batch, *x.shape[1:]), chunks)
        return jnp.mean(jax.lax.map(lambda a: one(params, a[0], a[1]),
                                    (parts, jnp.arange(n // batch))))

    return loss
