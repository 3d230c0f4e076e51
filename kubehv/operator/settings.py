"""Settings of the agent and the controller, and how they configure kopf.

Why this module exists: the command line (kubehv.cli) fills these plain dataclasses; the
operator modules read them. Keeping kopf's own knobs here (server-side field selectors,
watch timeouts, no event posting of its own) makes sure an agent only ever receives its
node's objects. kubehv registers only event handlers, so kopf keeps no state on the objects
(no finalizers, no annotations) and needs no persistence settings.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from typing import Any

import kopf

from kubehv.api import constants
from kubehv.operator import instance_logic, kubeconfig

LOGIN_TTL = datetime.timedelta(minutes=5)
"""How long kopf keeps a service-account token before it logs in (re-reads it) again."""


@dataclasses.dataclass
class SecretSettings:
    """Where the agent reads its instances' Secret keys (kubehv.operator.secret_source)."""

    source: str = "api"  # "api": its own credentials; "controller": the hand-over
    url: str = "https://kubehv-webhook.kubehv-system.svc/secrets"
    server_name: str = ""  # the name the controller's certificate is checked for ("": url's)
    token_file: str = "/var/run/secrets/kubehv.io/secret-handover/token"  # noqa: S105 - a path
    ca_from: str = "kubehv"  # the ValidatingWebhookConfiguration whose caBundle verifies it


@dataclasses.dataclass
class AgentSettings:
    node_name: str
    hypervisor: str = "fake"
    connection_uri: str | None = None
    # What other nodes use to reach this hypervisor (NodeHypervisor spec.connectionURI);
    # None: the connection URI serves both (it names a host already, or nothing migrates).
    advertise_uri: str | None = None
    state_dir: str = "/var/lib/kubehv"
    migration_address: str | None = None
    heartbeat_interval_s: float = 10.0
    resync_interval_s: float = 2.0
    balloon_interval_s: float = 5.0  # the auto-balloon loop (balloon_loop); 0 turns it off
    metrics_port: int = 0
    kubeconfig: str | None = None
    driver_params: dict[str, Any] = dataclasses.field(default_factory=dict)
    policy: instance_logic.Policy = dataclasses.field(default_factory=instance_logic.Policy)
    # read by the source role of a migration (kubehv.operator.migration_source)
    migration_stall_timeout_s: float = 60.0
    migration_progress_interval_s: float = 0.5
    secrets: SecretSettings = dataclasses.field(default_factory=SecretSettings)


@dataclasses.dataclass
class ControllerSettings:
    heartbeat_grace_s: float = 40.0
    check_interval_s: float = 2.0
    webhook_port: int = 0  # 0: no webhook
    webhook_host: str = "127.0.0.1"
    webhook_name: str = "kubehv.io"
    metrics_port: int = 0
    health_port: int = 0
    kubeconfig: str | None = None
    leader_election: bool = True
    lease_name: str = "kubehv-controller"
    lease_namespace: str = "default"
    lease_duration_s: float = 15.0
    identity: str = ""
    max_migrations_per_node: int | None = None
    max_migrations_per_cluster: int | None = None


def configure_agent_kopf(settings: kopf.OperatorSettings, node: str) -> None:
    """Server-side filtering of VirtualInstances to this node's."""
    settings.watching.field_selectors[constants.GROUP, constants.PLURAL_VI] = (
        f"status.nodeName={node}"
    )
    _common(settings)


def configure_controller_kopf(settings: kopf.OperatorSettings) -> None:
    _common(settings)


def _common(settings: kopf.OperatorSettings) -> None:
    settings.posting.level = logging.WARNING  # kubehv posts its own Events (events.py)
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.error_backoffs = [1, 2, 5, 10]
    settings.execution.max_workers = 8


def register_login(registry: kopf.OperatorRegistry, creds: kubeconfig.Credentials) -> None:
    """A private registry has no default login handler: kopf gets the same identity as
    kubehv's own client (:mod:`kubeconfig`), so neither needs the ``kubernetes`` package.
    A token file is re-read on every login (kopf logs in again after a 401 and when the
    info expires, so a rotated service-account token is picked up)."""

    @kopf.on.login(registry=registry, id="login")
    def login(**_: Any) -> kopf.ConnectionInfo:
        creds.refresh()
        expires = None
        if creds.token_file:
            expires = datetime.datetime.now(datetime.UTC) + LOGIN_TTL
        return kopf.ConnectionInfo(
            server=creds.server,
            ca_path=creds.ca_file,
            insecure=creds.insecure or None,
            token=creds.token,
            certificate_path=creds.cert_file,
            private_key_path=creds.key_file,
            default_namespace=creds.namespace,
            expiration=expires,
        )
