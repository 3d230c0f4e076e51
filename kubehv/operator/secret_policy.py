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

Which fields name Secrets an agent must read (raw objects, so a field the model of this
version does not know yet is still honoured): the VNC password
``spec.console.vnc.passwordSecretRef`` (when VNC is enabled) and the cloud-init user data
``spec.cloudInit.userDataSecretRef``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
"""userInfo.extra key of a pod-bound ServiceAccount token's node (Kubernetes >= 1.30)."""

OPEN_MIGRATION_DONE = frozenset({"Succeeded", "Failed", "Aborted"})


@dataclasses.dataclass(frozen=True)
class SecretKey:
    """One key of one Secret, in a namespace: what an agent asks for."""

    namespace: str
    name: str
    key: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name} key {self.key}"


@dataclasses.dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    """Why, for the log and the 403 answer (names objects, never a secret value)."""


def caller_node(user: Mapping[str, Any], agent_username: str) -> Decision:
    """From a TokenReview's ``status.user``: allowed with the node name as ``reason``, or
    refused with why (not the agent's ServiceAccount, no node claim)."""
    username = str(user.get("username") or "")
    if username != agent_username:
        return Decision(False, f"{username or 'an anonymous caller'} is not {agent_username}")
    extra = user.get("extra") or {}
    nodes = extra.get(NODE_NAME_EXTRA) if isinstance(extra, Mapping) else None
    node = str(nodes[0]) if isinstance(nodes, list) and nodes and nodes[0] else ""
    if not node:
        return Decision(
            False,
            "the token is not bound to a pod on a node (no "
            f"{NODE_NAME_EXTRA} claim): use the pod's projected ServiceAccount token",
        )
    return Decision(True, node)


def _get(obj: Mapping[str, Any], *path: str) -> Any:
    cur: Any = obj
    for part in path:
        if not isinstance(cur, Mapping):
            return None
        cur = cur.get(part)
    return cur


def _ref(ref: Any) -> tuple[str, str] | None:
    if not isinstance(ref, Mapping):
        return None
    name, key = ref.get("name"), ref.get("key")
    return (str(name), str(key)) if name and key else None


def secret_refs(vi: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The (Secret name, key) pairs a VirtualInstance's agent must read to run it."""
    out = []
    vnc = _get(vi, "spec", "console", "vnc")
    if isinstance(vnc, Mapping) and vnc.get("enabled") is True:
        ref = _ref(vnc.get("passwordSecretRef"))
        if ref:
            out.append(ref)
    ref = _ref(_get(vi, "spec", "cloudInit", "userDataSecretRef"))
    if ref:
        out.append(ref)
    return out


def _migrating_to(node: str, migrations: Iterable[Mapping[str, Any]]) -> set[str]:
    """Names of the instances (in the migrations' namespace) with an open Migration to node."""
    return {
        str(_get(m, "spec", "instance"))
        for m in migrations
        if _get(m, "status", "targetNode") == node
        and _get(m, "status", "phase") not in OPEN_MIGRATION_DONE
        and _get(m, "spec", "instance")
    }


def decide(
    node: str,
    wanted: SecretKey,
    instances: Iterable[Mapping[str, Any]],
    migrations: Iterable[Mapping[str, Any]],
) -> Decision:
    """May the agent of ``node`` read ``wanted``? ``instances`` and ``migrations`` are those
    of ``wanted.namespace`` (a Secret is only ever named from its own namespace)."""
    if not node:
        return Decision(False, "no node: the caller's token names none")
    incoming = _migrating_to(node, [m for m in migrations if _ns(m) == wanted.namespace])
    for vi in instances:
        if _ns(vi) != wanted.namespace or _get(vi, "metadata", "deletionTimestamp"):
            continue
        if (wanted.name, wanted.key) not in secret_refs(vi):
            continue
        name = str(_get(vi, "metadata", "name") or "")
        if _get(vi, "status", "nodeName") == node:
            return Decision(True, f"VirtualInstance {wanted.namespace}/{name} runs on {node}")
        if name in incoming:
            return Decision(
                True, f"VirtualInstance {wanted.namespace}/{name} is migrating to {node}"
            )
    return Decision(
        False,
        f"no VirtualInstance bound to node {node} (or migrating to it) names Secret {wanted}",
    )


def _ns(obj: Mapping[str, Any]) -> str:
    return str(_get(obj, "metadata", "namespace") or "")
