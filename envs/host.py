"""Batched host driver: B gymnasium environments stepped in-process or in worker processes.

Simulators that are not pure JAX (torch-based ones) step on the host. The policy and verifier
stay in the parent; workers only own environments. Workers start with the "spawn" context,
because the parent has already started JAX's threads and forking a threaded process can
deadlock, and they pin JAX (when an env imports it) to the CPU so they never claim the
accelerator the parent's policy runs on.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

EnvFactory = Callable[[], Any]


def _to_host(tree):
    """jax arrays (e.g. a functional env state in ``info``) as numpy, so they cross a pipe and
    stack cheaply; everything else untouched."""
    jax = sys.modules.get("jax")
    if jax is None:
        return tree
    return jax.tree.map(lambda v: np.asarray(v) if isinstance(v, jax.Array) else v, tree)


class _Envs:
    """A slice of the batch: the envs one worker (or the parent, with no workers) owns."""

    def __init__(self, factory: EnvFactory, n: int):
        self.envs = [factory() for _ in range(n)]

    def reset(self, seeds: Sequence, options: Sequence) -> list:
        return [_to_host(env.reset(seed=s, options=o))
                for env, s, o in zip(self.envs, seeds, options, strict=True)]

    def step(self, actions: np.ndarray, active: np.ndarray) -> list:
        """Steps only the active envs; ``None`` in the inactive slots."""
        return [_to_host(env.step(a)) if on else None
                for env, a, on in zip(self.envs, actions, active, strict=True)]

    def rollout_chunks(self, chunks: np.ndarray, active: np.ndarray, bonus: list) -> list:
        """Each active env's candidate outcomes from its current state (``None`` elsewhere)."""
        return [env.rollout_chunks(c, b) if on else None
                for env, c, on, b in zip(self.envs, chunks, active, bonus, strict=True)]

    def close(self) -> None:
        for env in self.envs:
            env.close()


def _pin_jax_to_cpu() -> None:
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:  # imported while unpickling the factory: config still applies
        sys.modules["jax"].config.update("jax_platforms", "cpu")


def _worker(conn, factory: EnvFactory, n: int) -> None:
    """Serve (command, args) requests until "close"; an exception is sent back as text."""
    _pin_jax_to_cpu()
    envs = None
    try:
        envs = _Envs(factory, n)
        conn.send(("ok", None))
        while True:
            cmd, args = conn.recv()
            if cmd == "close":
                break
            conn.send(("ok", getattr(envs, cmd)(*args)))
    except (EOFError, KeyboardInterrupt):
        pass
    except Exception as err:  # reported to the parent verbatim
        conn.send(("error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))
    finally:
        if envs is not None:
            envs.close()
        conn.close()


class HostDriver:
    """B environments behind one batched reset/step.

    ``factory`` builds one env and must pickle when ``workers`` >= 1 (a module-level callable,
    or ``functools.partial`` of one). ``workers`` = 0 steps every env in this process; W >= 1
    spreads the B envs over W spawned processes, contiguous slices of (nearly) B/W each.
    ``timeout`` bounds each wait for a worker's reply, so a hung simulator cannot hang the caller.

    ``nonfinite_obs`` int64 [B]: per env, how many observations since the last ``reset`` (the
    reset's one included) had a NaN or inf entry. Observations are passed on unchanged; a
    simulator that produces them is counted here so the caller can report it.
    """

    def __init__(self, factory: EnvFactory, num_envs: int, workers: int = 0,
                 timeout: float = 600.0):
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        if not 0 <= workers <= num_envs:
            raise ValueError(f"workers must be in [0, num_envs={num_envs}], got {workers}")
        self.num_envs, self.timeout = num_envs, timeout
        self.slices = [s.tolist() for s in np.array_split(np.arange(num_envs), max(workers, 1))]
        self._local = _Envs(factory, num_envs) if workers == 0 else None
        self._procs, self._conns = [], []
        self._obs: list = [None] * num_envs
        self._infos: list = [{}] * num_envs
        self.nonfinite_obs = np.zeros(num_envs, np.int64)
        if workers:
            ctx = mp.get_context("spawn")
            for i, idx in enumerate(self.slices):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_worker, args=(child, factory, len(idx)), daemon=True,
                                   name=f"steerlab-host-{i}")
                proc.start()
                child.close()
                self._procs.append(proc)
                self._conns.append(parent)
            self._gather([None] * workers)

    # -- worker traffic ---------------------------------------------------------------------

    def _recv(self, i: int):
        conn, proc = self._conns[i], self._procs[i]
        name, waited = f"host worker {i} (pid {proc.pid})", 0.0
        while not conn.poll(1.0):  # poll also wakes when the worker's end closes (it died)
            waited += 1.0
            if not proc.is_alive():
                self._fail(f"{name} died with exit code {proc.exitcode}")
            if waited >= self.timeout:
                self._fail(f"{name} sent nothing for {waited:.0f} s")
        try:
            status, payload = conn.recv()
        except EOFError:
            proc.join(timeout=5.0)
            self._fail(f"{name} died with exit code {proc.exitcode}")
        if status == "error":
            self._fail(f"{name} raised {payload}")
        return payload

    def _gather(self, requests: list) -> list:
        """Send one request per worker (None: just wait for a reply), then collect in order."""
        for i, req in enumerate(requests):
            if req is not None:
                try:
                    self._conns[i].send(req)
                except OSError as err:
                    self._fail(f"host worker {i} (pid {self._procs[i].pid}) is gone: {err}")
        return [self._recv(i) for i in range(len(self._conns))]

    def _fail(self, message: str):
        self.close()
        raise RuntimeError(message)

    def _call(self, cmd: str, per_env: Sequence[Sequence]) -> list:
        """Run ``cmd`` with per-env argument lists; per-env results in batch order."""
        if self._local is not None:
            return getattr(self._local, cmd)(*per_env)
        if not self._conns:
            raise RuntimeError("HostDriver: already closed")
        reqs = [(cmd, tuple([arg[j] for j in idx] for arg in per_env)) for idx in self.slices]
        return [r for part in self._gather(reqs) for r in part]

    # -- batched API --------------------------------------------------------------------------

    def reset(self, seeds: Sequence, options_list: Sequence[dict | None]):
        """Reset all B envs -> (obs batch: dict of [B, ...], list of B info dicts).

        Restarts ``nonfinite_obs`` at the count for the reset observations."""
        out = self._call("reset", [list(seeds), list(options_list)])
        self._obs = [obs for obs, _ in out]
        self._infos = [info for _, info in out]
        self.nonfinite_obs = np.array([has_nonfinite(obs) for obs in self._obs], np.int64)
        return stack_obs(self._obs), list(self._infos)

    def step(self, actions, active):
        """Step the envs where ``active`` [B] is true with ``actions`` [B, A].

        -> (obs batch, reward [B], terminated [B], truncated [B], infos). Inactive envs are not
        stepped: their slots repeat the last obs and info, with reward 0 and both flags false.
        Stepped envs whose new obs has a NaN or inf entry add 1 to ``nonfinite_obs``.
        """
        actions, active = np.asarray(actions), np.asarray(active, bool)
        if actions.shape[0] != self.num_envs or active.shape != (self.num_envs,):
            raise ValueError(f"step: expected actions [{self.num_envs}, A] and active "
                             f"[{self.num_envs}], got {actions.shape} and {active.shape}")
        out = self._call("step", [list(actions), list(active)])
        reward = np.zeros(self.num_envs, np.float32)
        terminated = np.zeros(self.num_envs, bool)
        truncated = np.zeros(self.num_envs, bool)
        for j, res in enumerate(out):
            if res is not None:
                self._obs[j], reward[j], terminated[j], truncated[j], self._infos[j] = res
                self.nonfinite_obs[j] += has_nonfinite(self._obs[j])
        return stack_obs(self._obs), reward, terminated, truncated, list(self._infos)

    def rollout_chunks(self, chunks, active, success_bonus: float) -> np.ndarray:
        """The simulator oracle on the host: every active env executes each of its candidate
        chunks ``chunks`` [B, M, h, A] from its current state, which it then restores
        (``env.rollout_chunks(chunks, success_bonus)``: progress after the chunk, plus
        ``success_bonus`` if it succeeded). -> scores float32 [B, M], 0 for inactive envs."""
        chunks, active = np.asarray(chunks, np.float32), np.asarray(active, bool)
        out = self._call("rollout_chunks", [list(chunks), list(active),
                                            [success_bonus] * self.num_envs])
        return np.stack([np.zeros(chunks.shape[1], np.float32) if r is None
                         else np.asarray(r, np.float32) for r in out])

    def close(self) -> None:
        """Stop workers (politely, then by force); safe to call twice."""
        if self._local is not None:
            self._local.close()
            self._local = None
        for conn in self._conns:
            try:
                conn.send(("close", ()))
            except (OSError, ValueError):
                pass
        for proc, conn in zip(self._procs, self._conns):
            proc.join(timeout=5.0)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5.0)
            conn.close()
        self._procs, self._conns = [], []

    def __enter__(self) -> HostDriver:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def has_nonfinite(obs) -> bool:
    """True when any floating entry of an observation (a dict of arrays, or one array) is NaN
    or inf; integer and image entries cannot be."""
    for v in obs.values() if isinstance(obs, dict) else (obs,):
        v = np.asarray(v)
        if v.dtype.kind in "fc" and not np.isfinite(v).all():
            return True
    return False


def stack_obs(obs_list: Sequence[dict]) -> dict[str, np.ndarray]:
    """Per-env observation dicts -> one dict of arrays batched along axis 0."""
    return {k: np.stack([np.asarray(o[k]) for o in obs_list]) for k in obs_list[0]}
