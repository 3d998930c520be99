"""Adapters by name (see ``algos.base``).

    a = make_adapter("none")                              # or make_adapter(name, context, config)
    chunk = a.act(a.state, obs, context, candidates, index, key)   # f32 [H, A]

Adapter modules register themselves with ``register_adapter`` when imported; ``algos/__init__``
imports each once (one line per module).
"""

from __future__ import annotations

from typing import Any

from algos.base import Adapter, AdapterPlugin, BuildContext, ExecuteChosen

ADAPTERS: dict[str, AdapterPlugin] = {}


def register_adapter(plugin: AdapterPlugin) -> AdapterPlugin:
    if plugin.name in ADAPTERS and ADAPTERS[plugin.name] is not plugin:
        raise ValueError(f"adapter {plugin.name!r} is registered twice")
    ADAPTERS[plugin.name] = plugin
    return plugin


def known_adapters() -> list[str]:
    return sorted(ADAPTERS)


def get_adapter_plugin(name: str) -> AdapterPlugin:
    if name not in ADAPTERS:
        raise ValueError(f"adapter: unknown name {name!r}; known: {known_adapters()}")
    return ADAPTERS[name]


def make_adapter(name: str, context: BuildContext | None = None, config: Any = None) -> Adapter:
    """Builds the adapter registered as ``name`` (its default config unless one is given)."""
    plugin = get_adapter_plugin(name)
    return plugin.build(plugin.config() if config is None else config,
                        context or BuildContext())


register_adapter(AdapterPlugin(ExecuteChosen, lambda cfg, ctx: ExecuteChosen()))
