"""How ``make demo`` turns ``examples/`` into objects for its own nodes and driver.

Why: the examples are written for a reader (node ``node-a``, a kernel under /var/lib/kubehv);
the demo applies them to the nodes it started, with the guest it built, and runs the Migration
example only once its instance runs (a Migration of a Pending instance would just fail).
"""

from __future__ import annotations

import json
from typing import Any

from kubehv.devenv.demonodes import KvmSetup


def adapt_example(
    doc: dict[str, Any],
    driver: str,
    node: str,
    kvm: KvmSetup | None,
    *,
    connection_uri: str | None = None,
    migration_address: str | None = None,
) -> dict[str, Any]:
    """An example as the demo applies it: on this driver, on this node, booting the guest.

    The NodeHypervisor example describes a node called ``node-a``; the demo's one node is
    this machine, whose agent has already registered it: the example becomes that object
    (same name, driver and URI), so applying it adds its labels instead of a second node
    that no agent serves and that would never be Ready.
    """
    if doc.get("kind") == "NodeHypervisor":
        doc = json.loads(json.dumps(doc))
        doc.setdefault("metadata", {})["name"] = node
        spec = doc.setdefault("spec", {})
        spec["nodeName"] = node
        spec["hypervisor"] = driver
        if connection_uri:
            spec["connectionURI"] = connection_uri
        # The node's own migration address (two nodes), or none (one node: nothing to
        # migrate to). The example may be applied before the agent registers the node, and
        # an agent keeps an existing NodeHypervisor's spec, so it must be right here.
        if migration_address:
            spec["migrationAddress"] = migration_address
        else:
            spec.pop("migrationAddress", None)
        return doc
    if doc.get("kind") != "VirtualInstance":
        return doc
    doc = json.loads(json.dumps(doc))  # a deep copy
    spec = doc.setdefault("spec", {})
    spec["hypervisor"] = driver
    for key in ("nodeName", "node"):
        if key in spec:
            spec[key] = node
    if kvm is not None:
        boot = spec.setdefault("boot", {})
        boot["kernel"] = str(kvm.kernel)
        boot["initrd"] = str(kvm.initrd)
        boot["cmdline"] = kvm.cmdline
    return doc
