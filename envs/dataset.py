"""Demonstration datasets: expert mixtures rolled out in the tabletop suite, stored as npz.

Layout of a dataset directory:
    steps.npz      per-step arrays [N, ...]: state, image (optional), instruction, task_id,
                   action, reward, done, success, progress, episode, t
    episodes.npz   per-episode arrays [E]: mode, length, success, seed
    manifest.json  schema_version, task, variant, mix, seed, counts, per-mode success, shapes

Only steps taken before an episode ended are stored, so episodes have variable length and
``episode_slices`` locate them. ``mode`` indexes ``envs.experts.ALL_MODES`` (the same index in
every task).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from envs.experts import ALL_MODES, MODES, rollout
from envs.tabletop import TASKS, VARIANTS, make

SCHEMA_VERSION = 1
# The mixture of the example, the same for every task: pi* the largest component, and
# failure modes that look plausible. wrong_object (a language-grounding failure) is left to
# --mix: in the default it would dominate what a small policy gets wrong.
_MIX = {"optimal": 0.6, "hesitant": 0.15, "detour": 0.15, "sloppy": 0.1}
DEFAULT_MIX: dict[str, dict[str, float]] = {task: dict(_MIX) for task in
                                            ("reach", "push", "pick_place", "sort")}
STEP_KEYS = (
    "state",
    "instruction",
    "task_id",
    "action",
    "reward",
    "done",
    "success",
    "progress",
    "episode",
    "t",
)
OBS_KEYS = ("state", "image", "instruction", "task_id")
EPISODE_KEYS = ("mode", "length", "success")
_DTYPES = {
    "state": "float32",
    "image": "uint8",
    "instruction": "int32",
    "task_id": "int32",
    "action": "float32",
    "reward": "float32",
    "done": "bool",
    "success": "bool",
    "progress": "float32",
    "episode": "int32",
    "t": "int32",
    "mode": "int32",
    "length": "int32",
}
_BATCH = 64  # episodes per compiled rollout call; bounds memory when images are on


def _check_task_variant(task: str, variant: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task: unknown {task!r}; allowed values are {TASKS}")
    if variant not in VARIANTS:
        raise ValueError(f"variant: unknown {variant!r}; allowed values are {VARIANTS}")


def parse_mix(text: str) -> dict[str, float]:
    """'optimal=0.6,hesitant=0.4' -> {"optimal": 0.6, "hesitant": 0.4} (syntax only)."""
    mix: dict[str, float] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"mix: malformed entry {part!r}; expected 'mode=weight,...'")
        if name in mix:
            raise ValueError(f"mix: mode {name!r} given twice")
        try:
            mix[name] = float(value)
        except ValueError:
            raise ValueError(f"mix: weight of {name!r} is not a number: {value!r}") from None
    if not mix:
        raise ValueError("mix: empty; expected 'mode=weight,...'")
    return mix


def validate_mix(task: str, mix: dict[str, float] | str) -> dict[str, float]:
    """Check mode names against MODES[task] and that weights are >= 0 and sum to 1."""
    _check_task_variant(task, "nominal")
    if isinstance(mix, str):
        mix = parse_mix(mix)
    allowed = MODES[task]
    for name, w in mix.items():
        if name not in allowed:
            raise ValueError(f"mix: unknown mode {name!r} for task {task!r}; allowed: {allowed}")
        if not np.isfinite(w) or w < 0:
            raise ValueError(f"mix: weight of {name!r} must be a finite number >= 0, got {w}")
    total = sum(mix.values())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"mix: weights must sum to 1 (tolerance 1e-6), got {total:.9g}")
    return {k: float(v) for k, v in mix.items()}


@functools.cache
def _rollout_fn(task: str, variant: str, image: bool):
    env = make(task, variant, image=image)
    return jax.jit(jax.vmap(lambda k, m: rollout(env, k, m)))


def _collect(task: str, variant: str, image: bool, keys: np.ndarray, modes: np.ndarray):
    fn = _rollout_fn(task, variant, image)
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


def write_demos(
    task: str,
    episodes: int,
    mix: dict[str, float] | str | None,
    seed: int,
    out_dir: str,
    variant: str = "nominal",
    image: bool = True,
    overwrite: bool = False,
) -> dict:
    """Roll out experts (mode per episode drawn from `mix`) and write a dataset -> manifest.

    The directory is written to a temporary sibling and renamed into place, so an error never
    leaves a partial dataset behind.
    """
    _check_task_variant(task, variant)
    mix = validate_mix(task, DEFAULT_MIX[task] if mix is None else mix)
    if not isinstance(episodes, int) or episodes < 1:
        raise ValueError(f"episodes: must be a positive int, got {episodes!r}")
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise ValueError(f"out_dir: {out_dir} exists; pass overwrite=True to replace it")

    rng = np.random.default_rng(seed)
    names = list(mix)
    drawn = rng.choice(len(names), size=episodes, p=np.array([mix[n] for n in names]))
    modes = np.array([ALL_MODES.index(names[i]) for i in drawn], np.int32)
    keys = np.asarray(jax.random.split(jax.random.PRNGKey(seed), episodes))
    traj = _collect(task, variant, image, keys, modes)

    ep_success = (traj["success"] & traj["valid"]).any(1)
    valid = _recorded(traj["valid"], traj["action"])  # [E, T]
    lengths = valid.sum(1).astype(np.int32)
    T = valid.shape[1]
    flat = lambda x: x[valid]  # keeps episode order, drops steps after done
    steps = {k: flat(traj["obs"][k]) for k in OBS_KEYS if k in traj["obs"]}
    for k in ("action", "reward", "done", "success", "progress"):
        steps[k] = flat(traj[k])
    steps["episode"] = flat(np.broadcast_to(np.arange(episodes)[:, None], (episodes, T)))
    steps["t"] = flat(np.broadcast_to(np.arange(T)[None, :], (episodes, T)))
    steps = {k: np.ascontiguousarray(v, dtype=_DTYPES[k]) for k, v in steps.items()}
    eps = {"mode": modes, "length": lengths, "success": ep_success.astype(bool)}

    per_mode = {}
    for name in names:
        sel = modes == ALL_MODES.index(name)
        per_mode[name] = {
            "episodes": int(sel.sum()),
            "success_rate": float(ep_success[sel].mean()) if sel.any() else None,
            "mean_length": float(lengths[sel].mean()) if sel.any() else None,
        }
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "task": task,
        "variant": variant,
        "mix": mix,
        "seed": int(seed),
        "image": bool(image),
        "modes": list(ALL_MODES),
        "counts": {
            "episodes": int(episodes),
            "steps": int(lengths.sum()),
            "successes": int(ep_success.sum()),
        },
        "success_rate": float(ep_success.mean()),
        "per_mode": per_mode,
        "arrays": {
            k: {"shape": list(v.shape[1:]), "dtype": str(v.dtype)} for k, v in steps.items()
        },
    }

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", dir=parent)
    try:
        np.savez_compressed(os.path.join(tmp, "steps.npz"), **steps)
        np.savez_compressed(os.path.join(tmp, "episodes.npz"), **eps)
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=2)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


@dataclass
class Dataset:
    """Loaded demonstrations: per-step ``steps`` [N, ...] and per-episode ``episodes`` [E]."""

    steps: dict[str, np.ndarray]
    episodes: dict[str, np.ndarray]
    manifest: dict
    _starts: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        lengths = self.episodes["length"].astype(np.int64)
        self._starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)

    @property
    def num_episodes(self) -> int:
        return int(len(self.episodes["length"]))

    @property
    def num_steps(self) -> int:
        return int(len(self.steps["action"]))

    @property
    def episode_slices(self) -> list[slice]:
        ends = self._starts + self.episodes["length"]
        return [slice(int(a), int(b)) for a, b in zip(self._starts, ends, strict=True)]

    @property
    def obs(self) -> dict[str, np.ndarray]:
        return {k: self.steps[k] for k in OBS_KEYS if k in self.steps}

    def __getitem__(self, key: str) -> np.ndarray:
        return self.steps[key] if key in self.steps else self.episodes[key]

    def chunks(self, H: int) -> dict:
        """Chunked view for training: at every step, the next H actions of its episode.

        -> obs (dict [N, ...]), actions f32 [N, H, A] (padded by repeating the episode's last
        action), valid bool [N, H], mode i32 [N], episode i32 [N].
        """
        if not isinstance(H, int) or H < 1:
            raise ValueError(f"H: must be a positive int, got {H!r}")
        ep = self.steps["episode"].astype(np.int64)
        ends = (self._starts + self.episodes["length"])[ep]  # [N] exclusive end of own episode
        idx = np.arange(self.num_steps)[:, None] + np.arange(H)[None, :]  # [N, H]
        valid = idx < ends[:, None]
        idx = np.minimum(idx, ends[:, None] - 1)
        return {
            "obs": self.obs,
            "actions": self.steps["action"][idx],
            "valid": valid,
            "mode": self.episodes["mode"][ep].astype(np.int32),
            "episode": ep.astype(np.int32),
        }


def _fail(path: str, what: str):
    raise ValueError(f"dataset {path}: {what}")


def load_demos(path: str) -> Dataset:
    """Read and validate a dataset written by ``write_demos``."""
    mpath = os.path.join(path, "manifest.json")
    if not os.path.isfile(mpath):
        _fail(path, "manifest.json not found")
    with open(mpath) as f:
        manifest = json.load(f)
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        _fail(path, f"schema_version {version!r} is not supported (expected {SCHEMA_VERSION})")
    for name in ("steps.npz", "episodes.npz"):
        if not os.path.isfile(os.path.join(path, name)):
            _fail(path, f"{name} not found")
    with np.load(os.path.join(path, "steps.npz")) as z:
        steps = {k: z[k] for k in z.files}
    with np.load(os.path.join(path, "episodes.npz")) as z:
        eps = {k: z[k] for k in z.files}
    required = list(STEP_KEYS) + (["image"] if manifest.get("image") else [])
    for k in required:
        if k not in steps:
            _fail(path, f"steps.npz lacks key {k!r} (required: {required})")
    for k in EPISODE_KEYS:
        if k not in eps:
            _fail(path, f"episodes.npz lacks key {k!r} (required: {list(EPISODE_KEYS)})")
    n = len(steps["action"])
    for k, v in steps.items():
        if k not in _DTYPES:
            continue
        if str(v.dtype) != _DTYPES[k]:
            _fail(path, f"steps[{k!r}] has dtype {v.dtype}, expected {_DTYPES[k]}")
        if len(v) != n:
            _fail(path, f"steps[{k!r}] has {len(v)} rows, expected {n}")
        want = manifest.get("arrays", {}).get(k, {}).get("shape")
        if want is not None and list(v.shape[1:]) != want:
            _fail(path, f"steps[{k!r}] has shape {list(v.shape[1:])}, manifest says {want}")
    if int(eps["length"].sum()) != n:
        _fail(path, f"episode lengths sum to {int(eps['length'].sum())}, but there are {n} steps")
    counts = manifest.get("counts", {})
    if counts.get("episodes") not in (None, len(eps["length"])):
        _fail(
            path, f"manifest counts {counts.get('episodes')} episodes, found {len(eps['length'])}"
        )
    return Dataset(steps=steps, episodes=eps, manifest=manifest)


def combine(datasets: list[Dataset]) -> Dataset:
    """Concatenate datasets (e.g. several tasks) into one; episode indices are renumbered."""
    if not datasets:
        raise ValueError("datasets: need at least one dataset to combine")
    step_keys = set(datasets[0].steps)
    for d in datasets[1:]:
        if set(d.steps) != step_keys:
            raise ValueError(
                f"datasets: step keys differ ({sorted(step_keys)} vs {sorted(d.steps)}); "
                "combine datasets written with the same image setting"
            )
    offsets = np.cumsum([0] + [d.num_episodes for d in datasets[:-1]])
    steps = {}
    for k in step_keys:
        parts = [
            d.steps[k] + (off if k == "episode" else 0)
            for d, off in zip(datasets, offsets, strict=True)
        ]
        steps[k] = np.concatenate(parts).astype(datasets[0].steps[k].dtype)
    eps = {k: np.concatenate([d.episodes[k] for d in datasets]) for k in datasets[0].episodes}
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "combined": [d.manifest for d in datasets],
        "tasks": sorted({d.manifest.get("task", "?") for d in datasets}),
        "counts": {"episodes": int(len(eps["length"])), "steps": int(len(steps["action"]))},
    }
    return Dataset(steps=steps, episodes=eps, manifest=manifest)


def summarize(manifest: dict) -> str:
    """A few readable lines about a dataset manifest."""
    if "combined" in manifest:
        return "\n\n".join(summarize(m) for m in manifest["combined"])
    c = manifest["counts"]
    lines = [
        f"task={manifest['task']} variant={manifest['variant']} seed={manifest['seed']} "
        f"image={manifest.get('image')}",
        f"episodes={c['episodes']} steps={c['steps']} success={manifest['success_rate']:.3f}",
        f"{'mode':<14}{'weight':>8}{'episodes':>10}{'success':>9}{'mean len':>10}",
    ]
    for name, st in manifest["per_mode"].items():
        sr = "-" if st["success_rate"] is None else f"{st['success_rate']:.3f}"
        ml = "-" if st["mean_length"] is None else f"{st['mean_length']:.1f}"
        lines.append(f"{name:<14}{manifest['mix'][name]:>8.3f}{st['episodes']:>10}{sr:>9}{ml:>10}")
    return "\n".join(lines)
