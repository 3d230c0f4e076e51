"""Heartbeat loss: which nodes went silent, and what their instances must show.

Why this module exists: a node whose agent stopped reporting may still run its VMs (a
partition, a hung agent), so the controller never re-places them: it only says so, with the
NodeHypervisor's Ready condition Unknown (as Kubernetes' node lifecycle controller does for a
kubelet) and each of the node's VirtualInstances in phase Unknown. The agent, when back,
overwrites both from what it really sees. Pure functions; the controller does the writes.
"""

from __future__ import annotations

import datetime
from typing import Any

from kubehv import api
from kubehv.api import conditions, constants
from kubehv.api import virtualinstance as vim
from kubehv.operator import placement, status

REASON_NODE = "NodeHeartbeatLost"
REASON_INSTANCE = "NodeLost"


def is_stale(node: api.NodeHypervisor, now: datetime.datetime, grace_s: float) -> bool:
    age = placement.heartbeat_age_s(node, now)
    return age is not None and age > grace_s


def node_status_patch(
    node: api.NodeHypervisor, now: datetime.datetime, grace_s: float
) -> dict[str, Any]:
    """The NodeHypervisor status patch for a silent node ({} when already marked)."""
    st = node.status
    ready = conditions.get_condition(st.conditions, constants.COND_READY)
    if (
        ready is not None
        and ready.status is conditions.ConditionStatus.UNKNOWN
        and ready.reason == REASON_NODE
    ):
        return {}
    age = int(placement.heartbeat_age_s(node, now) or 0)
    cond = status.Condition(
        constants.COND_READY,
        None,
        REASON_NODE,
        f"no heartbeat from the node agent for {age}s (grace {int(grace_s)}s); its instances "
        "are Unknown and will not be started elsewhere",
    )
    return {"conditions": status.merge_model_conditions(st.conditions, [cond])}


# Phases left alone: nothing was started yet (Pending, Scheduled), already said, nothing runs,
# or the Migration owns the instance and says where it is (the source's silence is handled by
# the migration's own deadline).
_KEEP = frozenset(
    {
        None,
        vim.Phase.PENDING,
        vim.Phase.SCHEDULED,
        vim.Phase.UNKNOWN,
        vim.Phase.STOPPED,
        vim.Phase.FAILED,
        vim.Phase.MIGRATING,
    }
)


def instance_status_patch(vi: api.VirtualInstance, node: str) -> dict[str, Any]:
    """The VirtualInstance status patch for an instance of a silent node ({} when marked)."""
    st = vi.status
    if st.phase in _KEEP:
        return {}
    cond = status.Condition(
        constants.COND_READY,
        None,
        REASON_INSTANCE,
        f"node {node} stopped reporting; the instance may still run there",
    )
    return {
        "phase": vim.Phase.UNKNOWN.value,
        "conditions": status.merge_model_conditions(st.conditions, [cond]),
    }
