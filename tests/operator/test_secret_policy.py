"""The controller's Secret hand-over decision, rule by rule (kubehv.operator.secret_policy).

Why: "a node reads only the secrets of its own instances" is a claim about one pure
function; each row is one situation an agent (honest or compromised) can ask about, with the
answer the hand-over must give.
"""

from __future__ import annotations

from typing import Any

import pytest

from kubehv import api
from kubehv.operator import secret_policy as sp

NS = "team"
AGENT = "system:serviceaccount:kubehv-system:kubehv-agent"


def vi(
    name: str,
    node: str | None,
    *,
    vnc: dict[str, Any] | None = None,
    user_data: dict[str, str] | None = None,
    namespace: str = NS,
    deleting: bool = False,
) -> api.VirtualInstance:
    spec: dict[str, Any] = {
        "hypervisor": "fake",
        "memory": {"min": "128Mi", "max": "256Mi"},
        "vcpus": 1,
    }
    if vnc is not None:
        spec["console"] = {"vnc": vnc}
    if user_data is not None:
        spec["cloudInit"] = {"userDataSecretRef": user_data}
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if deleting:
        meta["deletionTimestamp"] = "2026-12-01T00:00:00Z"
    status = {"nodeName": node} if node else {}
    return api.VirtualInstance.model_validate({"metadata": meta, "spec": spec, "status": status})


def mig(instance: str, target: str, phase: str = "Running", namespace: str = NS) -> api.Migration:
    return api.Migration.model_validate(
        {
            "metadata": {"name": f"m-{instance}", "namespace": namespace},
            "spec": {"instance": instance},
            "status": {"sourceNode": "node-a", "targetNode": target, "phase": phase},
        }
    )


PW = {"enabled": True, "passwordSecretRef": {"name": "console", "key": "vm1"}}
WANT_PW = sp.SecretKey(NS, "console", "vm1")


ON_A = [vi("vm1", "node-a", vnc=PW)]
UD = {"name": "seed", "key": "userdata"}
WANT_UD = sp.SecretKey(NS, "seed", "userdata")
NO = "no VirtualInstance"
PW2 = {**PW, "passwordSecretRef": {"name": "console", "key": "vm2"}}


@pytest.mark.parametrize(
    ("node", "wanted", "instances", "migrations", "allowed", "why"),
    [
        ("node-a", WANT_PW, ON_A, [], True, "runs on node-a"),
        # The same Secret, asked by another node: refused.
        ("node-b", WANT_PW, ON_A, [], False, NO),
        # Another key of the same Secret (another node's instance's password): refused.
        ("node-a", sp.SecretKey(NS, "console", "vm2"), [*ON_A, vi("vm2", "node-b", vnc=PW2)],
         [], False, "node node-a"),
        # A Secret no instance names (a service account token, a TLS key): refused.
        ("node-a", sp.SecretKey(NS, "db", "password"), ON_A, [], False, NO),
        # The same names in another namespace do not count.
        ("node-a", sp.SecretKey("other", "console", "vm1"), ON_A, [], False, NO),
        # Not placed yet: nobody may read it.
        ("node-a", WANT_PW, [vi("vm1", None, vnc=PW)], [], False, NO),
        # VNC disabled: the password is not needed, so not handed over.
        ("node-a", WANT_PW, [vi("vm1", "node-a", vnc={**PW, "enabled": False})], [], False, NO),
        # Being deleted: the agent only stops it.
        ("node-a", WANT_PW, [vi("vm1", "node-a", vnc=PW, deleting=True)], [], False, NO),
        # The target of an open migration may read it; a finished one's may not.
        ("node-b", WANT_PW, ON_A, [mig("vm1", "node-b")], True, "migrating to node-b"),
        ("node-b", WANT_PW, ON_A, [mig("vm1", "node-b", "Succeeded")], False, NO),
        ("node-b", WANT_PW, ON_A, [mig("vm1", "node-b", "Aborted")], False, NO),
        # A migration of ANOTHER instance to node-b does not open vm1's Secret.
        ("node-b", WANT_PW, [*ON_A, vi("vm2", "node-a")], [mig("vm2", "node-b")], False, NO),
        # A migration to node-c does not open it for node-b; nor one in another namespace.
        ("node-b", WANT_PW, ON_A, [mig("vm1", "node-c")], False, NO),
        ("node-b", WANT_PW, ON_A, [mig("vm1", "node-b", namespace="other")], False, NO),
        # Two instances share a Secret key: the one on the caller's node is enough.
        ("node-b", WANT_PW, [*ON_A, vi("vm9", "node-b", vnc=PW)], [], True, "vm9 runs on node-b"),
        # cloud-init user data: handed to the instance's node and its migration target only.
        ("node-a", WANT_UD, [vi("vm1", "node-a", user_data=UD)], [], True, "runs on node-a"),
        ("node-b", WANT_UD, [vi("vm1", "node-a", user_data=UD)], [], False, NO),
        ("node-b", WANT_UD, [vi("vm1", "node-a", user_data=UD)], [mig("vm1", "node-b")], True,
         "migrating to node-b"),
        # No node claim at all.
        ("", WANT_PW, ON_A, [], False, "no node"),
    ],
)  # fmt: skip
def test_decide(
    node: str,
    wanted: sp.SecretKey,
    instances: list[api.VirtualInstance],
    migrations: list[api.Migration],
    allowed: bool,
    why: str,
) -> None:
    decision = sp.decide(node, wanted, instances, migrations)
    assert decision.allowed is allowed, decision.reason
    assert why in decision.reason


@pytest.mark.parametrize(
    ("username", "extra", "allowed", "reason"),
    [
        (AGENT, {sp.NODE_NAME_EXTRA: ["node-a"]}, True, "node-a"),
        # A token not bound to a pod on a node (a legacy Secret token): no node, refused.
        (AGENT, {}, False, "not bound to a pod"),
        (AGENT, {sp.NODE_NAME_EXTRA: []}, False, "not bound to a pod"),
        (AGENT, {sp.NODE_NAME_EXTRA: [""]}, False, "not bound to a pod"),
        # Anyone else, even with a node claim (another pod's token on that node): refused.
        (
            "system:serviceaccount:default:default",
            {sp.NODE_NAME_EXTRA: ["node-a"]},
            False,
            "is not system:serviceaccount:kubehv-system:kubehv-agent",
        ),
        ("system:serviceaccount:other:kubehv-agent", {}, False, "is not"),
        ("", {}, False, "anonymous"),
    ],
)
def test_caller_node(
    username: str, extra: dict[str, list[str]], allowed: bool, reason: str
) -> None:
    decision = sp.caller_node(username, extra, AGENT)
    assert decision.allowed is allowed
    assert reason in decision.reason


def test_secret_refs_lists_what_the_agent_reads() -> None:
    assert sp.secret_refs(vi("vm1", "n", vnc=PW)) == [("console", "vm1")]
    both = vi("vm1", "n", vnc=PW, user_data=UD)
    assert sp.secret_refs(both) == [("console", "vm1"), ("seed", "userdata")]
    assert sp.secret_refs(vi("vm1", "n")) == []
    assert sp.secret_refs(vi("vm1", "n", vnc={"enabled": True})) == []
    assert sp.secret_refs(vi("vm1", "n", vnc={**PW, "enabled": False})) == []
