"""Adapters by name (see ``algos.base``).

    a = make_adapter("none")                              # or make_adapter(name, context, config)
    chunk = a.act(a.state, obs, context, candidates, index, key)   # f32 [H, A]

Adapter modules register themselves with ``register_adapter`` when imported; ``algos/__init__``
imports each once (one line per module).
"""

from __future__ import annotations

from typing import Any

from algos.base import Adapter, AdapterPlugin, BuildContext, ExecuteChosen
from core.registry import Registry

ADAPTERS = Registry("adapter", "adapter")
register_adapter = ADAPTERS.register
known_adapters = ADAPTERS.known
get_adapter_plugin = ADAPTERS.lookup


def make_adapter(name: str, context: BuildContext | None = None, config: Any = None) -> Adapter:
    """Builds the adapter registered as ``name`` (its default config unless one is given)."""
    plugin = get_adapter_plugin(name)
    return plugin.build(plugin.config() if config is None else config,
                        context or BuildContext())


register_adapter(AdapterPlugin(ExecuteChosen, lambda cfg, ctx: ExecuteChosen()))
