"""Generate the kubehv CustomResourceDefinitions from the pydantic models.

Why this module exists: the CRDs must never disagree with the models the agent and the
controller parse objects with. So the openAPIV3Schema is derived from pydantic's JSON schema
and turned into a Kubernetes *structural* schema: $refs inlined, nullable unions collapsed
to the plain type, titles and ``additionalProperties: false`` dropped (the server prunes
unknown fields), quantities as ``x-kubernetes-int-or-string`` with a pattern. Printer
columns, selectable fields and CEL rules that span the whole object are declared here.
The output is plain data (and YAML text): no I/O.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import pydantic
import yaml

from kubehv.api import constants
from kubehv.api import migration as mig
from kubehv.api import nodehypervisor as nhv
from kubehv.api import virtualinstance as vi

_DROP = frozenset({"title", "$defs"})


@dataclasses.dataclass(frozen=True)
class Resource:
    """What a CRD needs beyond the spec and status schemas."""

    model: type[pydantic.BaseModel]
    spec: type[pydantic.BaseModel]
    status: type[pydantic.BaseModel]
    kind: str
    plural: str
    singular: str
    short: str
    namespaced: bool
    columns: tuple[dict[str, Any], ...]
    selectable: tuple[str, ...]
    root_rules: tuple[dict[str, str], ...] = ()

    @property
    def crd_name(self) -> str:
        return f"{self.plural}.{constants.GROUP}"

    @property
    def file_name(self) -> str:
        return f"{constants.GROUP}_{self.plural}.yaml"


def _col(name: str, type_: str, path: str, description: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": type_, "jsonPath": path, "description": description, **extra}


_AGE = _col("Age", "date", ".metadata.creationTimestamp", "Time since creation.")

RESOURCES: tuple[Resource, ...] = (
    Resource(
        model=vi.VirtualInstance,
        spec=vi.VirtualInstanceSpec,
        status=vi.VirtualInstanceStatus,
        kind=constants.KIND_VI,
        plural=constants.PLURAL_VI,
        singular=constants.SINGULAR_VI,
        short=constants.SHORT_VI,
        namespaced=True,
        columns=(
            _col("Phase", "string", ".status.phase", "Lifecycle phase."),
            _col("Node", "string", ".status.nodeName", "Node that runs the instance."),
            _col("Memory", "string", ".spec.memory.max", "Maximum guest memory."),
            _col("VCPUs", "integer", ".spec.vcpus", "Virtual CPUs."),
            _col("Hypervisor", "string", ".spec.hypervisor", "Driver.", priority=1),
            _col("Actual", "string", ".status.actualMemory", "Memory now.", priority=1),
            _col(
                "IP",
                "string",
                ".status.interfaces[0].ipAddresses[0]",
                "First address of the first guest interface.",
                priority=1,
            ),
            _AGE,
        ),
        selectable=(".status.nodeName", ".spec.hypervisor"),
    ),
    Resource(
        model=mig.Migration,
        spec=mig.MigrationSpec,
        status=mig.MigrationStatus,
        kind=constants.KIND_MIG,
        plural=constants.PLURAL_MIG,
        singular=constants.SINGULAR_MIG,
        short=constants.SHORT_MIG,
        namespaced=True,
        columns=(
            _col("Instance", "string", ".spec.instance", "VirtualInstance being moved."),
            _col("Phase", "string", ".status.phase", "Migration phase."),
            _col("Source", "string", ".status.sourceNode", "Node the instance leaves."),
            _col("Target", "string", ".status.targetNode", "Node the instance moves to."),
            _col("Progress", "integer", ".status.progress.percent", "Percent of memory copied."),
            _col("Mode", "string", ".spec.mode", "live or non-live.", priority=1),
            _col("Reason", "string", ".status.failureReason", "Failure reason.", priority=1),
            _AGE,
        ),
        selectable=(".status.sourceNode", ".status.targetNode", ".spec.instance"),
    ),
    Resource(
        model=nhv.NodeHypervisor,
        spec=nhv.NodeHypervisorSpec,
        status=nhv.NodeHypervisorStatus,
        kind=constants.KIND_NHV,
        plural=constants.PLURAL_NHV,
        singular=constants.SINGULAR_NHV,
        short=constants.SHORT_NHV,
        namespaced=False,
        columns=(
            _col("Node", "string", ".spec.nodeName", "Kubernetes node."),
            _col("Hypervisor", "string", ".spec.hypervisor", "Driver."),
            _col(
                "Ready",
                "string",
                '.status.conditions[?(@.type=="Ready")].status',
                "Whether the node agent reports Ready.",
            ),
            _col("Free Memory", "integer", ".status.memoryFree", "Free memory in MiB."),
            _col("Instances", "integer", ".status.instanceCount", "Running instances."),
            _col("Schedulable", "boolean", ".spec.schedulable", "Takes new instances.", priority=1),
            _col("Heartbeat", "date", ".status.lastHeartbeat", "Last agent report.", priority=1),
            _AGE,
        ),
        selectable=(".spec.nodeName",),
        root_rules=tuple(nhv.NAME_RULES),
    ),
)


def structural(node: Any, defs: dict[str, Any]) -> Any:
    """Turn one pydantic JSON-schema node into a Kubernetes structural-schema node."""
    if isinstance(node, list):
        return [structural(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    # $ref (and pydantic's older allOf-of-one-ref form): inline, the referring node wins.
    ref = node.pop("$ref", None)
    if ref is None and isinstance(node.get("allOf"), list) and len(node["allOf"]) == 1:
        ref = node.pop("allOf")[0].get("$ref")
    if ref is not None:
        target = structural(defs[ref.rsplit("/", 1)[-1]], defs)
        node = {**target, **node}
    # Nullable unions: Optional[X] becomes X (an absent field is how "unset" is said).
    any_of = node.get("anyOf")
    if isinstance(any_of, list) and {"type": "null"} in any_of:
        rest = [branch for branch in any_of if branch != {"type": "null"}]
        del node["anyOf"]
        if node.get("default", 0) is None:
            del node["default"]
        if len(rest) == 1:
            node = {**structural(rest[0], defs), **node}
        else:
            node["anyOf"] = rest
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP:
            continue
        if key == "additionalProperties" and value is False:
            continue
        if key == "properties":
            out[key] = {name: structural(sub, defs) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "anyOf"):
            out[key] = structural(value, defs)
        else:
            out[key] = value
    return _ordered(out)


_ORDER = ("description", "type", "format", "enum", "default")


def _ordered(node: dict[str, Any]) -> dict[str, Any]:
    head = {k: node[k] for k in _ORDER if k in node}
    return {**head, **{k: v for k, v in node.items() if k not in head}}


def object_schema(model: type[pydantic.BaseModel]) -> dict[str, Any]:
    """The structural schema of one model (spec or status)."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    result: dict[str, Any] = structural(raw, raw.get("$defs", {}))
    return result


def _doc(model: type[pydantic.BaseModel]) -> str:
    return " ".join(inspect.cleandoc(model.__doc__ or "").split())


def root_schema(res: Resource) -> dict[str, Any]:
    """The whole openAPIV3Schema of a resource."""
    schema: dict[str, Any] = {
        "description": _doc(res.model),
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {
                "description": "APIVersion of this object: kubehv.io/v1alpha1.",
                "type": "string",
            },
            "kind": {"description": f"Kind of this object: {res.kind}.", "type": "string"},
            # The server allows nothing but the type here (it owns ObjectMeta's schema).
            "metadata": {"type": "object"},
            "spec": object_schema(res.spec),
            "status": object_schema(res.status),
        },
    }
    if res.root_rules:
        schema["x-kubernetes-validations"] = [dict(rule) for rule in res.root_rules]
    return schema


def crd(res: Resource) -> dict[str, Any]:
    """One CustomResourceDefinition as a dict."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": res.crd_name,
            "annotations": {"kubehv.io/generated-by": "kubehv crds (from kubehv.api models)"},
        },
        "spec": {
            "group": constants.GROUP,
            "names": {
                "kind": res.kind,
                "listKind": f"{res.kind}List",
                "plural": res.plural,
                "singular": res.singular,
                "shortNames": [res.short],
                "categories": [constants.CATEGORY],
            },
            "scope": "Namespaced" if res.namespaced else "Cluster",
            "versions": [
                {
                    "name": constants.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [dict(c) for c in res.columns],
                    "selectableFields": [{"jsonPath": path} for path in res.selectable],
                    "schema": {"openAPIV3Schema": root_schema(res)},
                }
            ],
        },
    }


def to_yaml(doc: dict[str, Any]) -> str:
    """Deterministic YAML text for a generated document."""
    text: str = yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, width=100)
    return text


def render_all() -> dict[str, str]:
    """File name -> YAML text, for every CRD (what ``kubehv crds --output-dir`` writes)."""
    return {res.file_name: "---\n" + to_yaml(crd(res)) for res in RESOURCES}
