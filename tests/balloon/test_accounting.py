"""Committed-memory placement, node pressure readings and driver memory stats, without I/O.

Why: placement decides by committed memory (memory.min of auto-ballooned guests, memory.max
of the others) under the node's cap and overcommit ratio; these tables pin that rule, the
parsing of /proc/meminfo and PSI, the libvirt stats translation and the fake guest's stats.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kubehv import api
from kubehv.drivers import values
from kubehv.drivers.fake import memstats as fake_memstats
from kubehv.drivers.fake.driver import FakeHypervisor
from kubehv.drivers.libvirt import memstats
from kubehv.operator import memory_commit, memory_node, placement


def vi(name: str, lo: str, hi: str, auto: bool, node: str | None = None) -> api.VirtualInstance:
    body: dict[str, Any] = {
        "metadata": {"name": name, "namespace": "ns", "uid": name},
        "spec": {
            "hypervisor": "fake",
            "memory": {"min": lo, "max": hi},
            "autoBalloon": {"enabled": auto},
        },
        "status": {},
    }
    if node:
        body["status"] = {"nodeName": node, "phase": "Running", "actualMemory": lo}
    return api.VirtualInstance.model_validate(body)


def nhv(
    name: str, total: int = 4096, cap: str | None = None, ratio: float | None = None
) -> api.NodeHypervisor:
    spec: dict[str, Any] = {"nodeName": name, "hypervisor": "fake"}
    if cap:
        spec["guestMemoryCap"] = cap
    if ratio:
        spec["memoryOvercommitRatio"] = ratio
    return api.NodeHypervisor.model_validate(
        {
            "metadata": {"name": name},
            "spec": spec,
            "status": {
                "memoryTotal": total,
                "memoryFree": total,
                "memoryDom0": 0,
                "conditions": [{"type": "Ready", "status": "True", "reason": "Ready"}],
            },
        }
    )


CASES = [
    # (id, node, existing guests on it, new guest, fits?, reason fragment)
    ("auto-commits-min", nhv("a", cap="512Mi", ratio=3.0),
     [vi(f"g{i}", "96Mi", "256Mi", True, "a") for i in range(4)],
     vi("new", "96Mi", "256Mi", True), True, ""),
    ("static-commits-max", nhv("a", cap="512Mi", ratio=2.0),
     [vi(f"g{i}", "96Mi", "256Mi", True, "a") for i in range(4)],
     vi("new", "96Mi", "256Mi", False), False, "committed memory would be 640 MiB"),
    ("maxima-bounded-by-ratio", nhv("a", cap="512Mi", ratio=2.0),
     [vi(f"g{i}", "64Mi", "256Mi", True, "a") for i in range(4)],
     vi("new", "64Mi", "256Mi", True), False, "overcommit ratio 2"),
    ("no-overcommit-by-default", nhv("a", total=1024),
     [vi("g0", "96Mi", "512Mi", True, "a")],
     vi("new", "96Mi", "768Mi", True), False, "over 1024 MiB"),
    ("no-cap-uses-node-memory", nhv("a", total=1024, ratio=4.0),
     [vi("g0", "96Mi", "512Mi", True, "a")],
     vi("new", "96Mi", "768Mi", True), True, ""),
]  # fmt: skip


@pytest.mark.parametrize(("case", "node", "existing", "new", "fits", "reason"), CASES)
def test_placement_by_committed_memory(
    case: str, node: Any, existing: list[Any], new: Any, fits: bool, reason: str
) -> None:
    nodes = [node]
    assigned = [a for a in (placement.assigned_of(v) for v in existing) if a is not None]
    decision = placement.choose(placement.Request.of(new), nodes, assigned)
    assert (decision.node == "a") is fits, decision.message
    if not fits:
        assert decision.node is None
        assert reason in decision.message, decision.message


def test_commit_and_capacity_values() -> None:
    assert memory_commit.Commit.of(vi("x", "96Mi", "256Mi", True)) == memory_commit.Commit(96, 256)
    assert memory_commit.Commit.of(vi("x", "96Mi", "256Mi", False)) == memory_commit.Commit(
        256, 256
    )
    cap = memory_commit.Capacity.of(nhv("a", cap="1Gi", ratio=1.5))
    assert cap == memory_commit.Capacity(1024, 1.5, capped=True)


def test_meminfo_and_psi_parsing(tmp_path: Path) -> None:
    meminfo = "MemTotal:       24684032 kB\nMemFree: 1 kB\nMemAvailable:   23519744 kB\n"
    psi = "some avg10=12.50 avg60=3.00 avg300=0.10 total=123\nfull avg10=1.00 avg60=0 total=1\n"
    assert memory_node.parse_meminfo_available(meminfo) == 22968
    assert memory_node.parse_psi_some_avg10(psi) == 12.5
    assert memory_node.parse_psi_some_avg10("garbage") is None
    (tmp_path / "m").write_text(meminfo)
    got = memory_node.read(str(tmp_path / "m"), str(tmp_path / "absent"))
    assert got == memory_node.NodeMemory(22968, None)


def test_libvirt_stats_translation() -> None:
    raw = {
        "actual": 262144,
        "unused": 195584,
        "available": 223232,
        "usable": 198656,
        "major_fault": 2,
        "minor_fault": 592,
        "last_update": 1796141777,
        "rss": 228352,
    }
    stats = memstats.from_libvirt(raw)
    assert stats.actual_mib == 256
    assert stats.usable_mib == 194
    assert stats.used_mib == 62
    assert stats.major_faults == 2
    assert stats.reported
    before_first_report = memstats.from_libvirt({"actual": 131072})
    assert before_first_report.used_mib is None
    assert not before_first_report.reported


def test_fake_guest_stats_follow_its_use_and_fault_when_squeezed(tmp_path: Path) -> None:
    drv = FakeHypervisor(values.DriverConfig(node_name="n", state_dir=str(tmp_path)))
    spec = values.InstanceSpec(
        name="g", uid="u", memory_min_mib=96, memory_max_mib=256, params={"guest_used_mib": 60}
    )
    drv.start_instance(spec)
    stats = drv.get_instance_memory_stats("g")
    assert stats is not None
    assert (stats.actual_mib, stats.used_mib, stats.major_faults) == (256, 60, 0)
    fake_memstats.set_guest_used(str(tmp_path), "g", 200)
    drv.balloon_instance_memory(spec, 128)
    squeezed = drv.get_instance_memory_stats("g")
    assert squeezed is not None
    assert squeezed.usable_mib == 0
    assert squeezed.major_faults is not None and squeezed.major_faults > 0
    assert drv.get_instance_memory_stats("absent") is None


def test_migration_targets_use_the_same_committed_memory() -> None:
    moving = vi("m", "96Mi", "256Mi", False, "src")
    full = nhv("full", cap="512Mi", ratio=2.0)
    roomy = nhv("roomy", cap="1Gi", ratio=2.0)
    source = nhv("src", cap="256Mi")
    placed = [moving] + [vi(f"f{i}", "96Mi", "256Mi", True, "full") for i in range(3)]
    fits, unfit = memory_commit.migration_targets(moving, [full, roomy, source], placed)
    assert [n.metadata.name for n in fits] == ["roomy", "src"]
    assert "committed memory would be 544 MiB" in unfit["full"], unfit
