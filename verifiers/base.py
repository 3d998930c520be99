"""The verifier interface and the plugin spec that registers one.

A verifier scores M candidate chunks at one observation:

    score(vstate, obs, candidates, key) -> f32 [M]     # pure, jittable; higher is better

and carries its default state in ``v.state`` (``None`` for stateless ones), so a caller runs
``v.score(v.state, ...)`` for all of them alike. It declares what it needs in ``requires``; the
harness checks it when the run is built and adds privileged entries to ``obs``:
    "features"      the policy's features (always inside ``candidates``)
    "log_prob"      the policy's per-candidate log-probability
    "env_state"     the simulator state (obs["env_state"]) and an ``env`` given at build time
    "expert_chunk"  the expert's chunk at this state (obs["expert_chunk"], f32 [H, A])

A plugin (``VerifierPlugin``) says how a verifier is configured, built and fitted; registering
one makes it available by name to the run config (``verifier.name``, options under
``verifier.<name>``), ``steerlab fit-verifier``, ``bench sampling --verifier``, grids, the
quickstart and the report, with no per-name code anywhere else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import jax

from algos.base import BuildContext, NoOptions
from policies.base import Candidates

__all__ = ["BuildContext", "NoOptions", "Verifier", "VerifierPlugin", "REQUIREMENTS"]

REQUIREMENTS = ("features", "log_prob", "env_state", "expert_chunk")


class Verifier(Protocol):
    name: str
    requires: tuple[str, ...]
    state: Any

    def score(
        self, vstate: Any, obs: dict, candidates: Candidates, key: jax.Array
    ) -> jax.Array: ...


@dataclass(frozen=True)
class VerifierPlugin:
    """How one verifier is configured, built and (optionally) fitted.

    build(config, context) -> Verifier
    fit(config, context, params, demos, key, out_dir) -> None    # learned verifiers only
        the one ``fit`` signature (``algos.base``): ``context.policy`` is the policy, ``demos``
        the loaded dataset (``envs.dataset.Demos``: ``.chunks(H)``, ``.transitions(...)``);
        ``fit`` writes what ``build`` reads from ``context.fitted_dir``.
    init(config, context, key) -> Verifier                      # learned verifiers only
        an unfitted verifier of the fitted one's size, for cost benchmarks.
    """

    verifier: type
    """the verifier class; its ``name`` and ``requires`` are the plugin's"""
    build: Callable[[Any, BuildContext], Verifier]
    config: type = NoOptions
    fit: Callable[..., None] | None = None
    init: Callable[[Any, BuildContext, jax.Array], Verifier] | None = None
    jittable: bool = True
    """score is a pure JAX function (runs inside the compiled evaluation); False: host only"""
    quickstart: bool = True
    """part of the quickstart's sweep whenever the quickstart's policy meets ``requires``"""

    @property
    def name(self) -> str:
        return self.verifier.name

    @property
    def requires(self) -> tuple[str, ...]:
        return tuple(self.verifier.requires)

    def __post_init__(self):
        bad = [r for r in self.requires if r not in REQUIREMENTS]
        if bad:
            raise ValueError(f"verifier {self.name!r}: requires {bad}, allowed: "
                             f"{list(REQUIREMENTS)}")
        if (self.fit is None) != (self.init is None):
            raise ValueError(f"verifier {self.name!r}: a learned verifier gives both fit and "
                             "init; others give neither")
