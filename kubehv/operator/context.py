"""What a running agent or controller shares with its handler modules.

Why this module exists: the agent's own handlers, the migration and drain modules (written
by other people) and the timers all need the same node name, driver and API client; one
small object passed to each ``register(registry, ctx)`` keeps them decoupled from kopf's
globals and from each other.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from kubehv.drivers import base
from kubehv.operator import k8s, rest, secret_source, settings


@dataclasses.dataclass
class AgentContext:
    settings: settings.AgentSettings
    api_client: rest.Client
    kube: k8s.Kube
    driver: base.BaseHypervisor
    secrets: secret_source.SecretSource
    """Where its instances' Secret keys come from (the controller, or its own API access)."""
    node_defaults: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The NodeHypervisor's ``spec.defaultParameters`` (refreshed on every heartbeat)."""

    @property
    def node_name(self) -> str:
        return self.settings.node_name

    @property
    def driver_cls(self) -> type[base.BaseHypervisor]:
        return type(self.driver)


@dataclasses.dataclass
class ControllerContext:
    settings: settings.ControllerSettings
    api_client: rest.Client
    kube: k8s.Kube
