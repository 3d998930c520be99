"""The verifier interface: score M candidate chunks at one observation.

    score(vstate, obs, candidates, key) -> f32 [M]     # pure, jittable; higher is better

A verifier declares what it needs in ``requires``; the harness checks it when the run is built
and, for oracle verifiers, adds privileged entries to ``obs``:
    "features"      the policy's features (always inside ``candidates``)
    "log_prob"      the policy's per-candidate log-probability
    "env_state"     the simulator state (obs["env_state"]) and an ``env`` given at build time
    "expert_chunk"  the expert's chunk at this state (obs["expert_chunk"], f32 [H, A])
"""

from __future__ import annotations

from typing import Any, Protocol

import jax

from policies.base import Candidates


class Verifier(Protocol):
    name: str
    requires: tuple[str, ...]

    def score(
        self, vstate: Any, obs: dict, candidates: Candidates, key: jax.Array
    ) -> jax.Array: ...
