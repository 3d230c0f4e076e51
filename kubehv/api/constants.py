"""Names of the kubehv API that every component must spell the same way.

Why this module exists: the group, version, plurals, short names and the label, annotation
and finalizer keys appear in the CRDs, in the agent's watches, in the controller and in the
CLI. One place to spell them keeps a typo from becoming a silent mismatch between a writer
and its readers.
"""

from __future__ import annotations

from typing import Final

GROUP: Final = "kubehv.io"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"
CATEGORY: Final = "kubehv"

KIND_VI: Final = "VirtualInstance"
KIND_MIG: Final = "Migration"
KIND_NHV: Final = "NodeHypervisor"

PLURAL_VI: Final = "virtualinstances"
PLURAL_MIG: Final = "migrations"
PLURAL_NHV: Final = "nodehypervisors"

SINGULAR_VI: Final = "virtualinstance"
SINGULAR_MIG: Final = "migration"
SINGULAR_NHV: Final = "nodehypervisor"

SHORT_VI: Final = "vi"
SHORT_MIG: Final = "mig"
SHORT_NHV: Final = "nhv"

# Field selectors the API server supports (CRD selectableFields).
FIELD_VI_NODE: Final = "status.nodeName"
FIELD_VI_HYPERVISOR: Final = "spec.hypervisor"
FIELD_MIG_SOURCE: Final = "status.sourceNode"
FIELD_MIG_TARGET: Final = "status.targetNode"
FIELD_MIG_INSTANCE: Final = "spec.instance"
FIELD_NHV_NODE: Final = "spec.nodeName"

# Annotations, labels and finalizers.
ABORT_ANNOTATION: Final = f"{GROUP}/abort"
"""Set to "true" on a Migration to abort it (deleting the Migration also aborts)."""
DRAIN_LABEL: Final = f"{GROUP}/drain"
"""Put on Migrations created by a node drain; the value is the drained node."""
INSTANCE_FINALIZER: Final = f"{GROUP}/instance"
MIGRATION_FINALIZER: Final = f"{GROUP}/migration"

# Condition types.
COND_READY: Final = "Ready"
COND_SCHEDULED: Final = "Scheduled"
COND_PARAMETERS_VALID: Final = "ParametersValid"
COND_MIGRATING: Final = "Migrating"
COND_VERIFIED: Final = "Verified"
