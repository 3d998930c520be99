"""Demonstration datasets: expert mixtures rolled out in the tabletop suite, stored as npz.

Layout of a dataset directory:
    steps.npz      per-step arrays [N, ...]: state, image (optional), instruction, task_id, time,
                   action, mode, reward, done, success, progress, episode, t, decision,
                   mode_label
    episodes.npz   per-episode arrays [E]: mode (-1 when modes change per segment), length,
                   success, wrong_block
    manifest.json  schema_version, task, variant, mix, segment, seed, counts, success, the
                   per-step mode shares by progress bin, the classifier's label accuracy, the
                   premise check, shapes

The expert mode is drawn per *segment* of ``segment`` steps (default 4, the harness's replan
length), so at every decision state the data is the mixture ``mix`` (``segment=0`` draws one
mode per episode instead, which lets slow failure modes dwell and outweigh pi* per step).
Decision steps are the first step of each segment; ``mode_label`` holds, at decision steps, the
mode classifier's (tie-splitting) label of the chunk executed from there, the same label the
harness gives a policy's executed chunks, so the two can be compared bin by bin.

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

from envs.experts import ALL_MODES, MODES, classify_chunk, expert_chunk, rollout, segment_key
from envs.mixture import (
    DEFAULT_MIX,
    bin_names,
    check_task_variant,
    label_accuracy,
    mode_shares_by_bin,
    premise_check,
    progress_bins,
    validate_mix,
)
from envs.tabletop import make
from envs.transitions import chunk_rows
from envs.transitions import transitions as _transitions

SCHEMA_VERSION = 2
DEFAULT_SEGMENT = 4
STEP_KEYS = (
    "state",
    "instruction",
    "task_id",
    "time",
    "action",
    "mode",
    "reward",
    "done",
    "success",
    "progress",
    "episode",
    "t",
    "decision",
    "mode_label",
)
OBS_KEYS = ("state", "image", "instruction", "task_id", "time")
EPISODE_KEYS = ("mode", "length", "success", "wrong_block")
_DTYPES = {
    "state": "float32",
    "image": "uint8",
    "instruction": "int32",
    "task_id": "int32",
    "time": "float32",
    "action": "float32",
    "reward": "float32",
    "done": "bool",
    "success": "bool",
    "progress": "float32",
    "episode": "int32",
    "t": "int32",
    "decision": "bool",
    "mode_label": "float32",
    "mode": "int32",
    "length": "int32",
    "wrong_block": "bool",
}
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


@functools.cache
def _rollout_fn(task: str, variant: str, image: bool, segment: int, h: int):
    env = make(task, variant, image=image)
    return jax.jit(jax.vmap(lambda k, m: labelled_rollout(env, k, m, segment, h)))


def _collect(task: str, variant: str, image: bool, keys: np.ndarray, modes: np.ndarray,
             segment: int):
    fn = _rollout_fn(task, variant, image, segment, segment or DEFAULT_SEGMENT)
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
    segment: int = DEFAULT_SEGMENT,
) -> dict:
    """Roll out experts (a mode per segment of ``segment`` steps drawn from ``mix``, a name in
    ``MIXTURES`` or 'mode=weight,...') and write a dataset -> manifest.

    The directory is written to a temporary sibling and renamed into place, so an error never
    leaves a partial dataset behind.
    """
    check_task_variant(task, variant)
    mix = validate_mix(task, DEFAULT_MIX if mix is None else mix)
    if not isinstance(episodes, int) or episodes < 1:
        raise ValueError(f"episodes: must be a positive int, got {episodes!r}")
    if not isinstance(segment, int) or segment < 0:
        raise ValueError(f"segment: must be an int >= 0 (0 = one mode per episode), "
                         f"got {segment!r}")
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise ValueError(f"out_dir: {out_dir} exists; give another --out, or delete it to "
                         "write it again (overwrite=True from Python)")

    T = make(task, variant).max_steps
    n_segments = -(-T // segment) if segment else 1
    rng = np.random.default_rng(seed)
    names = list(mix)
    drawn = rng.choice(len(names), size=(episodes, n_segments),
                       p=np.array([mix[n] for n in names]))
    modes = np.array([ALL_MODES.index(n) for n in names], np.int32)[drawn]  # [E, S]
    keys = np.asarray(jax.random.split(jax.random.PRNGKey(seed), episodes))
    traj = _collect(task, variant, image, keys, modes, segment)

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
    steps = {k: np.ascontiguousarray(v, dtype=_DTYPES[k]) for k, v in steps.items()}
    wrong = (traj["wrong_block"] & traj["valid"]).any(1)
    eps = {"mode": modes[:, 0] if not segment else np.full(episodes, -1, np.int32),
           "length": lengths, "success": ep_success.astype(bool), "wrong_block": wrong}

    task_modes = MODES[task]
    at = steps["decision"]
    bins = progress_bins(flat(traj["state_progress"])[at])
    true_shares, counts = mode_shares_by_bin(bins, np.eye(len(task_modes))[steps["mode"][at]])
    label_shares, _ = mode_shares_by_bin(bins, steps["mode_label"][at])
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "task": task,
        "variant": variant,
        "mix": mix,
        "segment": segment,
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

    def step_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Per step, its episode's first row and exclusive end row -> (start, end) [N]."""
        ep = self.steps["episode"].astype(np.int64)
        return self._starts[ep], (self._starts + self.episodes["length"])[ep]

    def chunks(self, H: int) -> dict:
        """Chunked view for training: at every step, the next H actions of its episode.

        -> obs (dict [N, ...]), actions f32 [N, H, A] (padded by repeating the episode's last
        action), valid bool [N, H], mode i32 [N] (the mode that took the step), decision
        bool [N], episode i32 [N].
        """
        if not isinstance(H, int) or H < 1:
            raise ValueError(f"H: must be a positive int, got {H!r}")
        ep = self.steps["episode"].astype(np.int64)
        idx, valid = chunk_rows(np.arange(self.num_steps), self.step_bounds()[1], H)
        return {
            "obs": self.obs,
            "actions": self.steps["action"][idx],
            "valid": valid,
            "mode": self.steps["mode"].astype(np.int32),
            "decision": self.steps["decision"].astype(bool),
            "episode": ep.astype(np.int32),
        }

    def transitions(self, H: int, replan: int, gamma: float) -> dict:
        """Per-decision transitions for chunk-level Q-learning (see ``envs.transitions``)."""
        return _transitions(self, H, replan, gamma)


def regenerate_command(path: str, manifest: dict | None = None) -> str:
    """The ``steerlab demos`` command that writes ``path`` again (with the manifest's settings
    when it could be read)."""
    m = manifest if isinstance(manifest, dict) else {}
    args = []
    for flag, key in (("task", "task"), ("variant", "variant"), ("seed", "seed"),
                      ("segment", "segment")):
        if isinstance(m.get(key), str | int) and not isinstance(m.get(key), bool):
            args.append(f"--{flag} {m[key]}")
    episodes = m.get("counts", {}).get("episodes") if isinstance(m.get("counts"), dict) else None
    if isinstance(episodes, int):
        args.append(f"--episodes {episodes}")
    if isinstance(m.get("mix"), dict) and m["mix"]:
        args.append("--mix " + ",".join(f"{k}={v:g}" for k, v in m["mix"].items()
                                        if isinstance(v, int | float)))
    return " ".join(["steerlab demos", *args, f"--out {path}"])


def _remedy(path: str, manifest: dict | None = None) -> str:
    return f"delete {path} and re-run `{regenerate_command(path, manifest)}`"


def _fail(path: str, what: str, manifest: dict | None = None):
    raise ValueError(f"dataset {path}: {what}; {_remedy(path, manifest)}")


def load_demos(path: str) -> Dataset:
    """Read and validate a dataset written by ``write_demos``. Every error names the dataset
    and the file at fault and says how to write the dataset again."""
    from core.io import MissingFileError, read_json_object, read_npz

    if not os.path.isdir(path):
        raise MissingFileError(f"dataset {path}: no such directory (a dataset holds "
                               f"manifest.json, steps.npz and episodes.npz); make one with "
                               f"`steerlab demos --out {path}`")
    mpath = os.path.join(path, "manifest.json")
    if not os.path.isfile(mpath):
        _fail(path, "manifest.json not found")
    manifest = read_json_object(mpath, _remedy(path))
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        _fail(path, f"schema_version {version!r} is not supported (expected {SCHEMA_VERSION})",
              manifest)
    for name in ("steps.npz", "episodes.npz"):
        if not os.path.isfile(os.path.join(path, name)):
            _fail(path, f"{name} not found", manifest)
    steps = read_npz(os.path.join(path, "steps.npz"), _remedy(path, manifest))
    eps = read_npz(os.path.join(path, "episodes.npz"), _remedy(path, manifest))
    required = list(STEP_KEYS) + (["image"] if manifest.get("image") else [])
    for k in required:
        if k not in steps:
            _fail(path, f"steps.npz lacks key {k!r} (required: {required})", manifest)
    for k in EPISODE_KEYS:
        if k not in eps:
            _fail(path, f"episodes.npz lacks key {k!r} (required: {list(EPISODE_KEYS)})",
                  manifest)
    n = len(steps["action"])
    arrays = manifest.get("arrays") if isinstance(manifest.get("arrays"), dict) else {}
    for k, v in steps.items():
        if k not in _DTYPES:
            continue
        if str(v.dtype) != _DTYPES[k]:
            _fail(path, f"steps[{k!r}] has dtype {v.dtype}, expected {_DTYPES[k]}", manifest)
        if len(v) != n:
            _fail(path, f"steps[{k!r}] has {len(v)} rows, expected {n}", manifest)
        want = arrays[k].get("shape") if isinstance(arrays.get(k), dict) else None
        if want is not None and list(v.shape[1:]) != want:
            _fail(path, f"steps[{k!r}] has shape {list(v.shape[1:])}, manifest says {want}",
                  manifest)
    if int(eps["length"].sum()) != n:
        _fail(path, f"episode lengths sum to {int(eps['length'].sum())}, but there are {n} "
              "steps", manifest)
    counts = manifest.get("counts") if isinstance(manifest.get("counts"), dict) else {}
    if counts.get("episodes") not in (None, len(eps["length"])):
        _fail(path, f"manifest counts {counts.get('episodes')} episodes, found "
              f"{len(eps['length'])}", manifest)
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
    """A few readable lines about a dataset manifest: counts, success, and the per-step mode
    shares by progress bin at decision steps (true modes) with the premise check."""
    if "combined" in manifest:
        return "\n\n".join(summarize(m) for m in manifest["combined"])
    c = manifest["counts"]
    mix = ",".join(f"{k}={v:g}" for k, v in manifest["mix"].items())
    lines = [
        f"task={manifest['task']} variant={manifest['variant']} seed={manifest['seed']} "
        f"image={manifest.get('image')} segment={manifest['segment']} mix={mix}",
        f"episodes={c['episodes']} steps={c['steps']} success={manifest['success_rate']:.3f} "
        f"wrong_block={manifest['wrong_block_rate']:.3f}",
    ]
    sh = manifest["mode_shares"]
    lines.append("per-step mode shares at decision steps, by progress bin:")
    lines.append(f"{'progress':<10}{'decisions':>10}" + "".join(f"{m:>14}" for m in sh["modes"]))
    for name, n, row in zip(sh["bins"], sh["decisions"], sh["true"], strict=True):
        lines.append(f"{name:<10}{n:>10}" + "".join(f"{v:>14.3f}" for v in row))
    p = manifest["premise"]
    if p["pi_star_min"] is not None:
        lines.append(f"premise (pi* in {p['targets']['pi_star']} and failure modes <= "
                     f"{p['targets']['failure_max']} in every bin): "
                     f"{'PASSED' if p['passed'] else 'NOT MET'} (pi* {p['pi_star_min']:.3f}-"
                     f"{p['pi_star_max']:.3f}, largest failure share {p['failure_max']:.3f})")
    acc = ", ".join(f"{m} {v['accuracy']:.2f}" for m, v in manifest["label_accuracy"].items())
    lines.append(f"mode classifier accuracy on these chunks: {acc}")
    return "\n".join(lines)
