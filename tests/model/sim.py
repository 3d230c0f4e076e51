"""One step of the model: the API server's and the hypervisors' answers to an actor's calls.

Why this module exists: an adapter step (one handler run of an agent or the controller) reads
and writes API objects and calls the driver, in the order kubehv's glue does, between two
frozen :class:`world.State` values. :class:`Sim` is that mutable in-between: it builds the
real object bodies kubehv's pure functions take (``metadata``/``spec``/``status`` dicts as the
API server returns them), applies their patches with the API server's rules (merge patch,
resourceVersion guard, finalizers), and can *lose* one chosen write (the fault "a lost or
conflicting write": the call fails with 409 after any effects before it).
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping
from typing import Any

from kubehv.drivers import values
from tests.model import world
from tests.model.world import NAMESPACE, NODES, T0, Conflict, NotFound, Obj

T0_TIME = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
GRACE_S = 40.0
TIMEOUT_S = 600
MEMORY = "256Mi"
SOURCE = "model"  # migration_info blob


def vi_body(obj: Obj) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": world.INSTANCE,
        "namespace": NAMESPACE,
        "uid": "uid-vm",
        "generation": 1,
        "resourceVersion": str(obj.rv),
        "finalizers": list(obj.finalizers),
        "creationTimestamp": T0,
    }
    if obj.deleting:
        meta["deletionTimestamp"] = T0
    return {
        "apiVersion": "kubehv.io/v1alpha1",
        "kind": "VirtualInstance",
        "metadata": meta,
        "spec": world.thaw(obj.spec),
        "status": world.thaw(obj.status),
    }


def mig_body(obj: Obj) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": obj.name,
        "namespace": NAMESPACE,
        "uid": f"uid-{obj.name}",
        "resourceVersion": str(obj.rv),
        "finalizers": list(obj.finalizers),
        "annotations": dict(obj.annotations),
        "creationTimestamp": T0,
    }
    if obj.deleting:
        meta["deletionTimestamp"] = T0
    status = world.thaw(obj.status)
    if status.get("sourceNode"):
        status["startTime"] = T0
    return {
        "apiVersion": "kubehv.io/v1alpha1",
        "kind": "Migration",
        "metadata": meta,
        "spec": world.thaw(obj.spec),
        "status": status,
    }


def node_body(name: str, node: world.Node, stale: bool) -> dict[str, Any]:
    beat = T0_TIME - datetime.timedelta(seconds=GRACE_S * 2 if stale else 0)
    conds: list[dict[str, Any]] = [
        {
            "type": "Ready",
            "status": node.ready,
            "reason": "Heartbeat" if node.ready == "True" else "NodeHeartbeatLost",
            "message": "",
            "lastTransitionTime": T0,
        }
    ]
    if node.drained:
        conds.append(
            {
                "type": "Drained",
                "status": node.drained,
                "reason": "Drained" if node.drained == "True" else "Draining",
                "message": "",
                "lastTransitionTime": T0,
            }
        )
    return {
        "apiVersion": "kubehv.io/v1alpha1",
        "kind": "NodeHypervisor",
        "metadata": {"name": name, "labels": {}, "resourceVersion": "1"},
        "spec": {
            "nodeName": name,
            "hypervisor": "kvm",
            "schedulable": True,
            "drain": node.drain,
            "migrationAddress": f"10.0.0.{NODES.index(name) + 1}",
            "connectionURI": f"qemu+tcp://{name}/system",
        },
        "status": {
            "conditions": conds,
            "memoryTotal": 8192,
            "memoryFree": 4096,
            "memoryDom0": 0,
            "lastHeartbeat": beat.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "hypervisorVersion": "9.0.0",
            "canMigrate": True,
        },
    }


def vi_spec(run_state: str = "Running", eviction: str = "LiveMigrate") -> world.Frozen:
    return world.freeze(
        {
            "hypervisor": "kvm",
            "memory": {"min": MEMORY, "max": MEMORY},
            "vcpus": 1,
            "runState": run_state,
            "evictionPolicy": eviction,
        }
    )


def mig_spec(target: str | None) -> world.Frozen:
    spec: dict[str, Any] = {"instance": world.INSTANCE, "mode": "live"}
    if target:
        spec["targetNode"] = target
    spec["completionTimeout"] = TIMEOUT_S
    return world.freeze(spec)


class Sim:
    """The world during one step; ``drop``: index of the API write to lose (None: none)."""

    def __init__(self, state: world.State, drop: int | None = None) -> None:
        self.state = state
        self.vi = state.vi
        self.mig = state.mig
        self.nodes = list(state.nodes)
        self.hv = world.Hypervisors(state.hyp)
        self.agents = list(state.agents)
        self.ctl_cache = state.ctl_cache
        self.writes = 0
        self.drop = drop
        self.did = ""  # what the step decided, for traces

    def frozen(self) -> world.State:
        return dataclasses.replace(
            self.state,
            vi=self.vi,
            mig=self.mig,
            nodes=(self.nodes[0], self.nodes[1]),
            hyp=self.hv.frozen(),
            agents=(self.agents[0], self.agents[1]),
            ctl_cache=self.ctl_cache,
        )

    # --- actors' memory ------------------------------------------------------------------

    def agent(self, node: str) -> world.Agent:
        return self.agents[NODES.index(node)]

    def set_agent(self, node: str, **changes: Any) -> None:
        i = NODES.index(node)
        self.agents[i] = dataclasses.replace(self.agents[i], **changes)

    def node(self, name: str) -> world.Node:
        return self.nodes[NODES.index(name)]

    def set_node(self, name: str, **changes: Any) -> None:
        i = NODES.index(name)
        self.nodes[i] = dataclasses.replace(self.nodes[i], **changes)

    # --- time --------------------------------------------------------------------------

    @property
    def now(self) -> datetime.datetime:
        return T0_TIME + datetime.timedelta(seconds=TIMEOUT_S * 2 if self.state.late else 1)

    # --- API server --------------------------------------------------------------------

    def _gate(self) -> None:
        n = self.writes
        self.writes += 1
        if n == self.drop:
            raise Conflict("the write was lost (injected)")

    def get_vi(self) -> dict[str, Any] | None:
        return None if self.vi is None else vi_body(self.vi)

    def list_vi_on(self, node: str) -> list[dict[str, Any]]:
        if self.vi is None or self.vi.stat("nodeName") != node:
            return []
        return [vi_body(self.vi)]

    def patch_vi_status(self, patch: Mapping[str, Any], rv: int | str | None) -> dict[str, Any]:
        self._gate()
        if self.vi is None:
            raise NotFound("virtualinstance")
        if rv is not None and int(rv) != self.vi.rv:
            raise Conflict("virtualinstance changed")
        self.vi = world.bump(self.vi, status=world.merge_status(self.vi, patch))
        return vi_body(self.vi)

    def set_vi_finalizers(self, finalizers: list[str], rv: int | str | None) -> dict[str, Any]:
        self._gate()
        if self.vi is None:
            raise NotFound("virtualinstance")
        if rv is not None and int(rv) != self.vi.rv:
            raise Conflict("virtualinstance changed")
        obj = world.bump(self.vi, finalizers=tuple(finalizers))
        self.vi = None if obj.deleting and not obj.finalizers else obj
        return vi_body(obj)

    def get_mig(self) -> dict[str, Any] | None:
        return None if self.mig is None else mig_body(self.mig)

    def patch_mig(self, patch: Mapping[str, Any]) -> dict[str, Any]:
        """A Migration status patch as migration_logic builds them (rv in its metadata)."""
        self._gate()
        if self.mig is None:
            raise NotFound("migration")
        rv = (patch.get("metadata") or {}).get("resourceVersion")
        if rv and int(rv) != self.mig.rv:
            raise Conflict("migration changed")
        self.mig = world.bump(self.mig, status=world.merge_status(self.mig, patch["status"]))
        return mig_body(self.mig)

    def set_mig_finalizers(self, finalizers: list[str], rv: str | None) -> dict[str, Any]:
        self._gate()
        if self.mig is None:
            raise NotFound("migration")
        if rv and int(rv) != self.mig.rv:
            raise Conflict("migration changed")
        obj = world.bump(self.mig, finalizers=tuple(finalizers))
        self.mig = None if obj.deleting and not obj.finalizers else obj
        return mig_body(obj)

    def create_mig(self, name: str, spec: world.Frozen) -> None:
        self._gate()
        if self.mig is not None:
            raise Conflict("a Migration exists already (the model holds one)")
        self.mig = Obj(rv=1, spec=spec, name=name)

    def node_bodies(self) -> list[dict[str, Any]]:
        return [node_body(n, self.node(n), self.agent(n).stale) for n in NODES]

    # --- hypervisor (as kubehv's kvm driver reports it) -----------------------------------

    def info(self, node: str) -> values.InstanceInfo | None:
        dom = self.hv.dom(node)
        if not dom:
            return None
        state = values.InstanceState.RUNNING if dom == "running" else values.InstanceState.PAUSED
        return values.InstanceInfo(
            name=world.DOMAIN, id="1", memory_mib=256, vcpus=1, state=state, cpu_time_s=0.0
        )

    def alive(self, node: str) -> bool:
        return bool(self.hv.dom(node))
