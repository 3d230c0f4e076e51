"""Which Secret key may which node's agent read: the controller's pure decision.

Why this module exists: node agents hold no RBAC on Secrets at all. The controller hands a
Secret key over (:mod:`secret_handover`) only when the caller is the agent ServiceAccount,
authenticated by a ServiceAccount token bound to a pod on a node (the token's
``authentication.kubernetes.io/node-name`` claim, as the ValidatingAdmissionPolicies in
manifests/base/rbac read it), and a VirtualInstance that names that very Secret and key is
bound to the caller's node (``status.nodeName``) or is the instance of an open Migration
whose ``status.targetNode`` is that node. So a compromised node reads the secrets of its own
instances and nothing else. No I/O here: the caller passes what it read fresh from the API,
and the table tests (tests/operator/test_secret_policy.py) cover each rule.

Which fields name Secrets an agent must read: the VNC password
``spec.console.vnc.passwordSecretRef`` (when VNC is enabled) and the cloud-init user data
``spec.cloudInit.userDataSecretRef``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence

import pydantic

from kubehv import api
from kubehv.api import migration as mig

PATH = "/secrets"
"""The hand-over's path on the controller's webhook server."""
AUDIENCE = "kubehv.io/secret-handover"
"""The audience of the agent's projected token (manifests/base/agent.yaml)."""
NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
"""userInfo.extra key of a pod-bound ServiceAccount token's node (Kubernetes >= 1.30)."""


@dataclasses.dataclass(frozen=True)
class SecretKey:
    """One key of one Secret, in a namespace: what an agent asks for."""

    namespace: str
    name: str
    key: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name} key {self.key}"


class Answer(pydantic.BaseModel):
    """The hand-over's JSON answer: the key's value (base64) or why not."""

    data: str | None = None
    reason: str | None = None


@dataclasses.dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    """Why, for the log and the 403 answer (names objects, never a secret value)."""


def caller_node(username: str, extra: Mapping[str, Sequence[str]], agent_username: str) -> Decision:
    """From a TokenReview's user: allowed with the node name as ``reason``, or refused with
    why (not the agent's ServiceAccount, no node claim)."""
    if username != agent_username:
        return Decision(False, f"{username or 'an anonymous caller'} is not {agent_username}")
    nodes = extra.get(NODE_NAME_EXTRA) or []
    node = str(nodes[0]) if nodes and nodes[0] else ""
    if not node:
        return Decision(
            False,
            "the token is not bound to a pod on a node (no "
            f"{NODE_NAME_EXTRA} claim): use the pod's projected ServiceAccount token",
        )
    return Decision(True, node)


def secret_refs(vi: api.VirtualInstance) -> list[tuple[str, str]]:
    """The (Secret name, key) pairs a VirtualInstance's agent must read to run it."""
    out = []
    vnc = vi.spec.console.vnc
    if vnc.enabled and vnc.password_secret_ref is not None:
        out.append((vnc.password_secret_ref.name, vnc.password_secret_ref.key))
    cloud_init = vi.spec.cloud_init
    if cloud_init is not None and cloud_init.user_data_secret_ref is not None:
        out.append((cloud_init.user_data_secret_ref.name, cloud_init.user_data_secret_ref.key))
    return out


def _migrating_to(node: str, namespace: str, migrations: Iterable[api.Migration]) -> set[str]:
    """Names of the instances of ``namespace`` with an open Migration to ``node``."""
    return {
        m.spec.instance
        for m in migrations
        if m.metadata.namespace == namespace
        and m.status.target_node == node
        and m.status.phase not in mig.TERMINAL_PHASES
    }


def decide(
    node: str,
    wanted: SecretKey,
    instances: Iterable[api.VirtualInstance],
    migrations: Iterable[api.Migration],
) -> Decision:
    """May the agent of ``node`` read ``wanted``? ``instances`` and ``migrations`` are those
    of ``wanted.namespace`` (a Secret is only ever named from its own namespace)."""
    if not node:
        return Decision(False, "no node: the caller's token names none")
    incoming = _migrating_to(node, wanted.namespace, migrations)
    for vi in instances:
        if vi.metadata.namespace != wanted.namespace or vi.metadata.deletion_timestamp:
            continue
        if (wanted.name, wanted.key) not in secret_refs(vi):
            continue
        name = vi.metadata.name or ""
        if vi.status.node_name == node:
            return Decision(True, f"VirtualInstance {wanted.namespace}/{name} runs on {node}")
        if name in incoming:
            return Decision(
                True, f"VirtualInstance {wanted.namespace}/{name} is migrating to {node}"
            )
    return Decision(
        False,
        f"no VirtualInstance bound to node {node} (or migrating to it) names Secret {wanted}",
    )
