"""The real node leaves the host as it found it; iptables clean-up removes only its chains.

Why: kubehv.devenv.kubenode changes host-wide state (sysctls, iptables, a bridge, cgroups,
mounts). A test bed that leaks any of it changes every later test on the machine, so the
state is compared before the node starts and after it stops, with a pod having run.
"""

from __future__ import annotations

import fcntl
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from kubehv.devenv import hostrestore, kubenode
from tests.kubelet.conftest import _need_node_parts

pytestmark = [pytest.mark.kubelet, pytest.mark.timeout(1800)]


def _chains(prefixes: tuple[str, ...]) -> list[str]:
    out = []
    for tool in ("iptables-save", "ip6tables-save"):
        dump = subprocess.run([tool], capture_output=True, text=True, check=False).stdout
        out += [line for line in dump.splitlines() if any(p in line for p in prefixes)]
    return out


def _host_state() -> dict[str, object]:
    return {
        "sysctls": hostrestore.read_sysctls(),
        "chains": _chains(hostrestore.CHAIN_PREFIXES),
        "bridge": Path(f"/sys/class/net/{kubenode.BRIDGE}").exists(),
        "kubepods": sorted(
            str(p) for p in Path("/sys/fs/cgroup").glob(f"*/{hostrestore.KUBEPODS}")
        ),
    }


def test_remove_iptables_chains_removes_its_prefix_and_the_jumps_only() -> None:
    chain = f"KHVTEST-{uuid.uuid4().hex[:8].upper()}"
    other = f"KHVKEEP-{uuid.uuid4().hex[:8].upper()}"
    rule = ["-d", "192.0.2.254/32", "-p", "tcp", "-m", "comment", "--comment", "kubehv test"]
    for name in (chain, other):
        subprocess.run(["iptables", "-N", name], check=True)
    subprocess.run(["iptables", "-A", "OUTPUT", *rule, "-j", chain], check=True)
    try:
        removed = hostrestore.remove_iptables_chains(("KHVTEST-",))
        assert removed == [f"iptables/filter/{chain}"]
        assert not _chains((chain,))
        assert _chains((other,)), "a chain of another prefix was removed"
    finally:
        subprocess.run(["iptables", "-D", "OUTPUT", *rule, "-j", chain], check=False)
        for name in (chain, other):
            subprocess.run(["iptables", "-X", name], check=False)


def _wait_no_other_node(timeout: float = 1800.0) -> None:
    """Another session's node (one per machine) would be part of "before": wait it out."""
    deadline = time.monotonic() + timeout
    with kubenode.LOCK_FILE.open("a") as fh:
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fh, fcntl.LOCK_UN)
                return
            except BlockingIOError:
                assert time.monotonic() < deadline, "another real node never stopped"
                time.sleep(2)


def test_node_start_and_stop_leave_the_host_as_found() -> None:
    _need_node_parts()
    _wait_no_other_node()
    before = _host_state()
    node = kubenode.KubeNode().start()
    try:
        pod = (
            '{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p","namespace":"default"},'
            '"spec":{"containers":[{"name":"p","image":"docker.io/library/kubehv-pause:3.10",'
            '"imagePullPolicy":"Never"}]}}'
        )
        node.kubectl("apply", "-f", "-", input=pod)
        node.kubectl("wait", "--for=condition=Ready", "pod/p", "--timeout=300s", timeout=330)
        during = _host_state()
        # The node did change the host (else this test would prove nothing).
        assert during["chains"] and during["bridge"] and during["kubepods"]
        mounts = Path("/proc/self/mountinfo").read_text()
        assert str(node.dir) in mounts
    finally:
        node.stop()
    assert _host_state() == before
    assert str(node.dir) not in Path("/proc/self/mountinfo").read_text()


_KILLED_NODE = """
import sys, time
from kubehv.devenv import kubenode
node = kubenode.KubeNode().start()
pod = ('{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p","namespace":"default"},'
       '"spec":{"containers":[{"name":"p","image":"docker.io/library/kubehv-pause:3.10",'
       '"imagePullPolicy":"Never"}]}}')
node.kubectl("apply", "-f", "-", input=pod)
node.kubectl("wait", "--for=condition=Ready", "pod/p", "--timeout=300s", timeout=330)
print("READY", flush=True)
time.sleep(3600)
"""


def test_a_node_killed_before_its_teardown_is_cleaned_up_by_the_next() -> None:
    _need_node_parts()
    _wait_no_other_node()
    before = _host_state()
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_NODE], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "READY"
    finally:
        proc.kill()  # no teardown at all: the host keeps the node's changes
        proc.wait(timeout=60)
    assert _host_state() != before
    assert hostrestore.HostState.restore_leftover(kubenode.BRIDGE)
    assert _host_state() == before
    assert not hostrestore.HostState.restore_leftover(kubenode.BRIDGE)  # nothing left
