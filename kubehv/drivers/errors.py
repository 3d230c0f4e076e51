"""The driver error hierarchy.

Why this module exists: the operator turns driver failures into status conditions a person
reads, so each error carries a stable ``reason`` (CamelCase, used as the condition reason)
and a message that says what went wrong and what to do, not a stack trace. Ganeti raises
``HypervisorError`` for everything; kubehv keeps that as the base class and adds subclasses
so callers can react (retry, give up, report) without parsing strings.
"""

from __future__ import annotations

from collections.abc import Sequence


class HypervisorError(Exception):
    """Base of every error a driver raises on purpose."""

    reason = "HypervisorError"
    retryable = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class HypervisorUnavailable(HypervisorError):
    """The hypervisor (e.g. libvirtd) cannot be reached; retrying later may help."""

    reason = "HypervisorUnavailable"
    retryable = True


class ParameterError(HypervisorError):
    """One or more hypervisor parameters are wrong. ``problems`` lists each, by name."""

    reason = "InvalidParameters"

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(self.problems) if self.problems else "invalid parameters")


class NodeParameterError(ParameterError):
    """Parameters are well-formed but do not hold on this node (missing file, no KVM...)."""

    reason = "ParametersInvalidOnNode"


class InvalidInstanceSpec(HypervisorError):
    """The instance itself is malformed (bad name, min memory above max, ...)."""

    reason = "InvalidInstance"


class InstanceNotFound(HypervisorError):
    reason = "InstanceNotFound"

    def __init__(self, name: str) -> None:
        super().__init__(f"instance {name!r} is not known to this hypervisor")
        self.name = name


class InstanceAlreadyRunning(HypervisorError):
    reason = "AlreadyRunning"

    def __init__(self, name: str) -> None:
        super().__init__(f"instance {name!r} is already running on this node")
        self.name = name


class InsufficientMemory(HypervisorError):
    reason = "InsufficientMemory"

    def __init__(self, name: str, needed_mib: int, free_mib: int) -> None:
        super().__init__(
            f"instance {name!r} needs at least {needed_mib} MiB but the node has only "
            f"{free_mib} MiB free"
        )
        self.needed_mib = needed_mib
        self.free_mib = free_mib


class InstanceStartError(HypervisorError):
    reason = "StartFailed"
    retryable = True


class InstanceStopError(HypervisorError):
    reason = "StopFailed"
    retryable = True


class MigrationError(HypervisorError):
    reason = "MigrationFailed"


class MigrationAborted(MigrationError):
    reason = "MigrationAborted"


class MigrationCompleted(MigrationError):
    """The target was asked to undo a migration that has already finished.

    Raised by ``finalize_migration_dst(success=False)`` when the copy on the target runs
    (the hypervisor resumed it, or it arrived and the migration job completed): the source
    copy is gone, so this one is the only copy and must not be destroyed. The caller treats
    the migration as succeeded (finalize with ``success=True``), never as failed.
    """

    reason = "MigrationCompleted"

    def __init__(self, name: str, node: str = "") -> None:
        where = f" on node {node}" if node else " on this node"
        super().__init__(
            f"the migration of {name!r} has already completed: the instance runs{where} and "
            "this is its only copy, so it was not destroyed; finish the migration as "
            "succeeded (finalize with success=True) instead of undoing it"
        )
        self.name = name


class NotSupported(HypervisorError):
    reason = "NotSupported"


class PowercycleRefused(HypervisorError):
    reason = "PowercycleRefused"

    def __init__(self) -> None:
        super().__init__(
            "refusing to powercycle this node: powercycle is disabled unless the agent is "
            "started with powercycle explicitly allowed"
        )


class UnknownDriver(HypervisorError):
    reason = "UnknownHypervisor"
