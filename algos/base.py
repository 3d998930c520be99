"""The adapter interface, its plugin spec, and the build context that adapters and verifiers share.

A verifier ranks the candidates; an adapter changes what is executed. In the harness a decision is

    sample M candidates → score them (verifier) → act (adapter) → execute ``replan`` steps

and ``act`` is the adapter's hook:

    act(astate, obs, context, candidates, index, key) -> f32 [H, A]   # pure, jittable

``index`` is the candidate the selection rule chose from the verifier's scores; ``context`` is
the policy's encoding of ``obs`` (``policy.encode``), so a residual can read the policy's own
features without encoding twice. The default adapter (``none``) executes the chosen candidate
unchanged; a residual policy (PLD) adds its correction to it; a test-time learner replaces the
parameters it acts with. An adapter carries its default state in ``a.state`` like a verifier.

A **test-time learner** (``learns = True``, TT-VLA) also learns during the episode. The harness
threads its learner state (the ``carry``) through the decisions of an episode:

    begin(astate) -> carry                                      # fresh: a new learner
    start_episode(carry) -> carry                               # at every episode's start
    before(carry, obs, context, progress, alive) -> (carry, steer)
    after(carry, context, candidates, index) -> carry
    update(carry, progress) -> carry                            # the learning step (timed)
    episode_records(carry) -> {name: value}                     # per-episode records

``before`` runs at every decision before sampling (it sees the env's progress so far and may
update the learner); ``steer`` changes how the M candidates are sampled
(``policy.sample_steered``: a flow policy's initial-noise mean, the autoregressive policy's
low-rank head update), which the verifier then ranks; ``after`` records the chosen candidate.
``continual`` says whether the carry passes from one episode to the next (a stream) or every
episode starts from ``begin``. A continual learner records its parameters after every episode
as ``learner/params/NAME``, which an evaluation writes to ``ADAPTERS_FILE``; its config's
``frozen_final(run_dir)`` deploys the streams' final adapters of such a run without learning,
and then ``stream_states`` is true: the state is one per stream, stacked on the first axis.

A plugin (``AdapterPlugin``) says how an adapter is configured, built and fitted; registering one
(``algos.registry.register_adapter``) makes it available by name to the run config
(``adapter.name``, options under ``adapter.<name>``), ``steerlab adapt`` and grids (the
``adapter`` stage), with no per-name code in ``experiments/``.

The one signature of ``fit``, for adapters and verifiers alike:

    fit(config, context, params, demos, key, out_dir) -> None

``context`` is the ``BuildContext`` (env, policy, replan), ``params`` the policy's parameters,
``demos`` the loaded dataset (``envs.dataset.Demos``); ``fit`` writes what ``build`` reads back
from ``context.fitted_dir``. An online learner steps ``context.env`` itself.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import jax

from core.config import from_dict
from core.io import read_json
from policies.base import Candidates


@dataclass(frozen=True)
class BuildContext:
    """What a verifier or adapter may be built and fitted from; unneeded fields stay ``None``."""

    env: Any = None
    """the functional env (its spec; the simulator itself for oracle verifiers and online fits)"""
    policy: Any = None
    """the base policy whose candidates are scored or adapted"""
    replan: int | None = None
    """steps of each chunk the harness executes before the next decision"""
    fitted_dir: str | None = None
    """what ``fit`` wrote, for learned plugins"""


def fitted_config(ctx: BuildContext, config_cls: type, what: str, command: str):
    """The config a fit wrote last into ``ctx.fitted_dir`` (its ``config.json`` marks a finished
    fit); a clear error naming ``what`` needs fitting, and by which command, when there is none."""
    path = None if ctx.fitted_dir is None else os.path.join(ctx.fitted_dir, "config.json")
    if path is None or not os.path.isfile(path):
        raise ValueError(f"{what} needs a fit (`{command}`); none at {ctx.fitted_dir!r}")
    return from_dict(config_cls, read_json(path))


@dataclass(frozen=True)
class NoOptions:
    """The config of a plugin that has no options."""


class Adapter(Protocol):
    name: str
    state: Any

    def act(self, astate: Any, obs: dict, context: Any, candidates: Candidates,
            index: jax.Array, key: jax.Array) -> jax.Array: ...


ADAPTERS_FILE = "adapters.npz"  # a continual learner's parameters after every episode


def learns(adapter: Any) -> bool:
    """Whether ``adapter`` is a test-time learner (see the module doc)."""
    return bool(getattr(adapter, "learns", False))


@dataclass(frozen=True)
class AdapterPlugin:
    """How one adapter is configured, built and (optionally) fitted.

    build(config, context) -> Adapter
    fit(config, context, params, demos, key, out_dir) -> None     # learned adapters only
    """

    adapter: type
    """the adapter class; its ``name`` is the plugin's"""
    build: Callable[[Any, BuildContext], Adapter]
    config: type = NoOptions
    fit: Callable[..., None] | None = None
    jittable: bool = True
    """act is a pure JAX function (runs inside the compiled evaluation); False: host only"""

    @property
    def name(self) -> str:
        return self.adapter.name


@dataclass(frozen=True)
class ExecuteChosen:
    """The default adapter: execute the candidate the verifier chose, unchanged."""

    name = "none"
    state = None

    def act(self, astate, obs, context, candidates, index, key):
        return candidates.actions[index]
