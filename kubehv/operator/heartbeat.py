"""Heartbeat loss: which nodes went silent, and what their instances must show.

Why this module exists: a node whose agent stopped reporting may still run its VMs (a
partition, a hung agent), so the controller never re-places them: it only says so, with the
NodeHypervisor's Ready condition Unknown (as Kubernetes' node lifecycle controller does for a
kubelet) and each of the node's VirtualInstances in phase Unknown. The agent, when back,
overwrites both from what it really sees. Pure functions; the controller does the writes.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

from kubehv.operator import placement, status

REASON_NODE = "NodeHeartbeatLost"
REASON_INSTANCE = "NodeLost"


def is_stale(node: placement.NodeView, now: datetime.datetime, grace_s: float) -> bool:
    age = node.heartbeat_age_s(now)
    return age is not None and age > grace_s


def node_status_patch(
    nhv: Mapping[str, Any], now: datetime.datetime, grace_s: float
) -> dict[str, Any]:
    """The NodeHypervisor status patch for a silent node ({} when already marked)."""
    st = nhv.get("status") or {}
    ready = status.condition(st, "Ready") or {}
    if ready.get("status") == "Unknown" and ready.get("reason") == REASON_NODE:
        return {}
    age = int(placement.NodeView.of(nhv).heartbeat_age_s(now) or 0)
    cond = status.Condition(
        "Ready",
        None,
        REASON_NODE,
        f"no heartbeat from the node agent for {age}s (grace {int(grace_s)}s); its instances "
        "are Unknown and will not be started elsewhere",
    )
    return {"conditions": status.merge_conditions(st.get("conditions") or [], [cond])}


def instance_status_patch(vi: Mapping[str, Any], node: str) -> dict[str, Any]:
    """The VirtualInstance status patch for an instance of a silent node ({} when marked)."""
    st = vi.get("status") or {}
    if st.get("phase") in ("Unknown", "Stopped", "Failed", "Migrating"):
        # Migrating: the Migration owns the instance and says where it is (the source's
        # silence is handled by the migration's own deadline), so its phase is left alone.
        return {}
    cond = status.Condition(
        "Ready",
        None,
        REASON_INSTANCE,
        f"node {node} stopped reporting; the instance may still run there",
    )
    return {
        "phase": "Unknown",
        "conditions": status.merge_conditions(st.get("conditions") or [], [cond]),
    }
