"""``kubehv drain NODE``: ask the controller to move every instance off a node.

Why a merge patch of ``NodeHypervisor.spec.drain``: draining is the node administrator's
operational request, not part of a user's GitOps-managed spec, and the NodeHypervisor is the
admin's object; the controller turns it into Migrations (or stops, per evictionPolicy).
``--undo`` sets it back (like ``kubectl uncordon``). ``--wait`` follows the controller's
``Drained`` condition on the NodeHypervisor (its message says what is left and which
migrations failed) and returns when it is True and no instance names the node any more.
"""

from __future__ import annotations

import argparse
import time

from kubehv import api
from kubehv.cli import kube


def add_arguments(parser: argparse.ArgumentParser) -> None:
    kube.add_arguments(parser, namespaced=False)
    parser.add_argument("node", metavar="NODE", help="the node (its NodeHypervisor's name)")
    parser.add_argument("--undo", action="store_true", help="stop draining (spec.drain=false)")
    parser.add_argument("--wait", action="store_true", help="wait until no instance remains")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds for --wait")


def run(args: argparse.Namespace) -> int:
    drain = not args.undo
    try:
        with kube.Kube(args) as k:
            k.patch_nhv(args.node, {"spec": {"drain": drain}})
            print(f"nodehypervisor/{args.node} {'draining' if drain else 'no longer draining'}")
            if not (drain and args.wait):
                return 0
            deadline = time.monotonic() + args.timeout
            said = ""
            while True:
                drained, message = drained_condition(k.get_nhv(args.node))
                left = k.vis_on_node(args.node)
                if drained and not left:
                    print(f"node {args.node} is drained")
                    return 0
                line = message or f"{len(left)} instance(s) left on {args.node}"
                if line != said:
                    print(line)
                    said = line
                if time.monotonic() > deadline:
                    return kube.fail(f"timed out: {line}")
                time.sleep(1.0)
    except (kube.ApiException, kube.BadObject) as exc:
        return kube.failure(exc, f"no NodeHypervisor named {args.node}")
    except KeyboardInterrupt:
        print(f"\nstill draining; undo with: kubehv drain --undo {args.node}")
        return 130


def drained_condition(nhv: api.NodeHypervisor) -> tuple[bool, str]:
    """(Drained is True, its message) from a NodeHypervisor; (False, "") before the controller
    has written it."""
    cond = kube.condition(nhv.status.conditions, "Drained")
    if cond is None:
        return False, ""
    return cond.status == api.conditions.ConditionStatus.TRUE, cond.message
