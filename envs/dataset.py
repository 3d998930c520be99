"""Demonstration datasets on disk: the layout, loading (``load_demos``) and the ``Dataset`` view.

Layout of a dataset directory:
    steps.npz      per-step arrays [N, ...]: state, image (optional), instruction, task_id, time,
                   action, mode, reward, done, success, progress, episode, t, decision,
                   mode_label
    episodes.npz   per-episode arrays [E]: mode (-1 when modes change per segment), length,
                   success, wrong_block
    manifest.json  schema_version, task, variant, mix, segment, max_steps (the episodes' time
                   limit), seed, counts, success, the per-step mode shares by progress bin, the
                   classifier's label accuracy, the premise check, shapes

``envs.demos.write_demos`` writes one (how modes, segments and decision steps are drawn is
described there). Only steps taken before an episode ended are stored, so episodes have
variable length and ``episode_slices`` locate them. ``mode`` indexes ``envs.experts.ALL_MODES``
(the same index in every task).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

from envs.transitions import chunk_rows
from envs.transitions import transitions as _transitions

SCHEMA_VERSION = 2
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


def save_dataset(out_dir: str, steps: dict, episodes: dict, manifest: dict) -> dict:
    """Writes a dataset in this layout into ``out_dir`` through a temporary sibling renamed into
    place (an error leaves nothing behind) -> the manifest, with ``schema_version`` and the
    arrays' shapes added. Steps and episodes are cast to the layout's dtypes."""
    from core.io import atomic_dir

    steps = {k: np.ascontiguousarray(v, dtype=_DTYPES.get(k)) for k, v in steps.items()}
    episodes = {k: np.ascontiguousarray(v, dtype=_DTYPES.get(k)) for k, v in episodes.items()}
    manifest = {"schema_version": SCHEMA_VERSION, **manifest,
                "arrays": {k: {"shape": list(v.shape[1:]), "dtype": str(v.dtype)}
                           for k, v in steps.items()}}
    with atomic_dir(out_dir) as tmp:
        np.savez_compressed(os.path.join(tmp, "steps.npz"), **steps)
        np.savez_compressed(os.path.join(tmp, "episodes.npz"), **episodes)
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=2)
    return manifest


def regenerate_command(path: str, manifest: dict | None = None) -> str:
    """The ``steerlab demos`` command that writes ``path`` again (with the manifest's settings
    when it could be read)."""
    m = manifest if isinstance(manifest, dict) else {}
    args = []
    for flag, key in (("suite", "suite"), ("task", "task"), ("variant", "variant"),
                      ("seed", "seed"), ("segment", "segment")):
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
        f"image={manifest.get('image')} segment={manifest['segment']} mix={mix} "
        f"max_steps={manifest.get('max_steps', '-')}",
        f"episodes={c['episodes']} steps={c['steps']} success={manifest['success_rate']:.3f}"
        + (f" wrong_block={manifest['wrong_block_rate']:.3f}"
           if "wrong_block_rate" in manifest else ""),
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
    if "label_accuracy" in manifest:  # the built-in suite's mode classifier
        acc = ", ".join(f"{m} {v['accuracy']:.2f}" for m, v in manifest["label_accuracy"].items())
        lines.append(f"mode classifier accuracy on these chunks: {acc}")
    return "\n".join(lines)
