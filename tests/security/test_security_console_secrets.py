"""Console passwords come only from Secrets and never show up in status, Events or logs.

Why: a VNC password in a VirtualInstance's status or in an Event is readable by anyone who
may list those objects (far more people than may read Secrets), and agent logs are shipped
to log stores. The agent reads the Secret, writes the password to a 0600 file for the
hypervisor, and nothing else. This test runs the real controller and fake-driver agents,
then greps everything a user or an operator could read for the secret value.
"""

from __future__ import annotations

import json
import stat
import uuid
from pathlib import Path
from typing import Any

import kubernetes
import pytest

from tests.fixtures.operator import OperatorCluster, condition, wait_for

pytestmark = pytest.mark.apiserver

G, V = "kubehv.io", "v1alpha1"


def _secret(c: OperatorCluster, namespace: str, name: str, value: str) -> None:
    body = kubernetes.client.V1Secret(
        metadata=kubernetes.client.V1ObjectMeta(name=name), string_data={"password": value}
    )
    c.core.create_namespaced_secret(namespace, body)


def _vnc(secret: str) -> dict[str, Any]:
    return {"vnc": {"enabled": True, "passwordSecretRef": {"name": secret, "key": "password"}}}


def _readable_everywhere(c: OperatorCluster, namespace: str) -> str:
    """Everything a user or operator can read: the namespace's VIs, Events, all logs, records."""
    vis = c.custom.list_namespaced_custom_object(G, V, namespace, "virtualinstances")
    events = c.core.list_namespaced_event(namespace)
    parts = [json.dumps(vis), json.dumps(c.api.sanitize_for_serialization(events))]
    for proc in [c.controller, *c.agents.values()]:
        parts.append(Path(proc.log).read_text(errors="replace"))
    for agent in c.agents.values():
        for record in (agent.state_dir / "instances").glob("*.json"):
            parts.append(record.read_text(errors="replace"))
    return "\n".join(parts)


def test_vnc_password_only_from_secret_never_leaks(
    operator_cluster: OperatorCluster, namespace: str
) -> None:
    c = operator_cluster
    value = f"pw-{uuid.uuid4().hex}"
    _secret(c, namespace, "console-pw", value)
    c.create_vi(namespace, "vnc-vm", console=_vnc("console-pw"))
    vi = c.wait_phase(namespace, "vnc-vm", "Running")
    node = vi["status"]["nodeName"]

    # The agent did read it: the hypervisor's password file holds it, private to root.
    files = [p for p in (c.agents[node].state_dir / "vnc").glob("*") if p.read_text() == value]
    assert len(files) == 1, "the agent did not hand the Secret's password to the hypervisor"
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600

    # An Event about the start exists (so the grep below looks at real Events).
    wait_for(lambda: any(e["reason"] == "Started" for e in c.events(namespace, "vnc-vm")), 30)
    assert value not in _readable_everywhere(c, namespace)

    # Deleting the instance removes the password file.
    c.custom.delete_namespaced_custom_object(G, V, namespace, "virtualinstances", "vnc-vm")
    wait_for(lambda: c.get_vi(namespace, "vnc-vm") is None, 60, "vnc-vm deleted")
    assert not files[0].exists()
    assert value not in _readable_everywhere(c, namespace)


def test_missing_secret_is_explained_without_a_password(
    operator_cluster: OperatorCluster, namespace: str
) -> None:
    c = operator_cluster
    c.create_vi(namespace, "no-secret", console=_vnc("does-not-exist"))

    def explained(vi: dict[str, Any]) -> bool:
        return "does-not-exist" in json.dumps(vi.get("status") or {})

    vi = c.wait_vi(namespace, "no-secret", explained, 60, "status names the missing Secret")
    assert vi["status"].get("phase") != "Running"
    assert condition(vi, "Ready").get("status") != "True"


def test_inline_password_is_not_stored(operator_cluster: OperatorCluster, namespace: str) -> None:
    """The API has no field for an inline password: rejected, or pruned and never stored."""
    c = operator_cluster
    value = f"inline-{uuid.uuid4().hex}"
    console = {"vnc": {"enabled": True, "password": value}}
    try:
        c.create_vi(namespace, "inline-pw", console=console)
    except kubernetes.client.ApiException as exc:
        assert exc.status in (400, 422), exc
        assert value not in str(exc.body or "")
        return
    stored = c.get_vi(namespace, "inline-pw")
    assert value not in json.dumps(stored)
