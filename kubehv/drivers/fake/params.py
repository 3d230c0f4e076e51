"""The fake driver's parameters: instance-level fault injection and node-level sizing.

Why this module exists: the operator's tests steer the fake hypervisor through ordinary,
declared hypervisor parameters (so the webhook's check_parameter_syntax sees them like any
other driver's), and configure the fake "node" through ``DriverConfig.params``. Both lists
live here, declared once with their checks.
"""

from __future__ import annotations

from collections.abc import Mapping

from kubehv.drivers import parameters, values

MIGRATION_STEPS = ("migration_info", "accept", "migrate", "finalize_dst", "finalize_source")
"""Where ``fail_migration_at`` can make a migration fail, in Ganeti's order."""

P = parameters.Parameter

PARAMETERS: Mapping[str, parameters.Parameter] = {
    p.name: p
    for p in (
        P("fail_start", bool, "start_instance fails with StartFailed", default=False),
        P(
            "fail_migration_at",
            str,
            "the migration step that fails with MigrationFailed",
            choices=MIGRATION_STEPS,
        ),
        P(
            "migration_duration_s",
            float,
            "how long the memory transfer of a migration takes (a slow migration)",
            default=0.0,
            syntax_check=parameters.is_non_negative,
            syntax_message="must be a non-negative number of seconds",
        ),
        P(
            "start_delay_s",
            float,
            "start_instance takes this long before the instance runs (a hypervisor that is "
            "slow to answer: QEMU starting under load, a busy daemon)",
            default=0.0,
            syntax_check=parameters.is_non_negative,
            syntax_message="must be a non-negative number of seconds",
        ),
        P(
            "crash_after_s",
            float,
            "the instance crashes (stops being alive) this long after each boot",
            syntax_check=parameters.is_positive,
            syntax_message="must be a positive number of seconds",
        ),
        P(
            "shutdown_delay_s",
            float,
            "a graceful stop leaves the instance shutting-down for this long before it is off",
            default=0.0,
            syntax_check=parameters.is_non_negative,
            syntax_message="must be a non-negative number of seconds",
        ),
        P(
            "guest_used_mib",
            int,
            "memory the guest holds at boot, as its balloon statistics report it "
            "(default: a quarter of its minimum memory)",
            syntax_check=parameters.is_non_negative,
            syntax_message="must be a non-negative number of MiB",
        ),
        P(
            "ignore_shutdown",
            bool,
            "the guest ignores graceful stop requests (only a forced stop ends it)",
            default=False,
        ),
    )
}

NODE_PARAMETERS: Mapping[str, parameters.Parameter] = {
    p.name: p
    for p in (
        P(
            "memory_total_mib",
            int,
            "the fake node's total memory",
            default=16384,
            syntax_check=parameters.is_positive,
            syntax_message="must be a positive number of MiB",
        ),
        P(
            "memory_mib",
            int,
            "alias of memory_total_mib (wins when both are set)",
            syntax_check=parameters.is_positive,
            syntax_message="must be a positive number of MiB",
        ),
        P(
            "memory_dom0_mib",
            int,
            "memory the fake node keeps for itself",
            default=0,
            syntax_check=parameters.is_non_negative,
            syntax_message="must be a non-negative number of MiB",
        ),
        P(
            "cpu_total",
            int,
            "the fake node's CPU count",
            default=4,
            syntax_check=parameters.is_positive,
            syntax_message="must be a positive number",
        ),
        P(
            "image_max_size_mib",
            int,
            "the largest image the node downloads (as the libvirt node parameter)",
            default=20480,
            syntax_check=parameters.is_positive,
            syntax_message="must be a positive number of MiB",
        ),
        P("verify_fail", str, "if not empty, verify() reports this problem", default=""),
        P("hypervisor_version", str, "the version the fake node reports", default="fake-1.0"),
    )
}


def param(params: Mapping[str, values.ParamValue], name: str) -> values.ParamValue | None:
    """An instance parameter's value, falling back to its declared default."""
    if name in params:
        return params[name]
    return PARAMETERS[name].default


def as_float(params: Mapping[str, values.ParamValue], name: str) -> float | None:
    value = param(params, name)
    if value is None or isinstance(value, bool | str):
        return None
    return float(value)


def as_bool(params: Mapping[str, values.ParamValue], name: str) -> bool:
    return param(params, name) is True


def fails_at(params: Mapping[str, values.ParamValue], step: str) -> bool:
    return param(params, "fail_migration_at") == step
