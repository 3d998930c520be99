"""Plugins of one kind by name: verifiers, adapters and env suites are each registered in one."""

from __future__ import annotations

from typing import Any


class Registry(dict):
    """``name -> plugin``; a name registers once, and a lookup of an unknown name is an error
    naming the config field and the known names."""

    def __init__(self, kind: str, field: str):
        super().__init__()
        self.kind, self.field = kind, field

    def register(self, plugin: Any) -> Any:
        if plugin.name in self and self[plugin.name] is not plugin:
            raise ValueError(f"{self.kind} {plugin.name!r} is registered twice")
        self[plugin.name] = plugin
        return plugin

    def known(self) -> list[str]:
        return sorted(self)

    def lookup(self, name: str, field: str | None = None) -> Any:
        if name not in self:
            raise ValueError(f"{field or self.field}: unknown {self.kind} {name!r}; known: "
                             f"{self.known()}")
        return self[name]
