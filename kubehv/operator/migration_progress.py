"""Migration progress and recovery on the source: pure functions over hypervisor answers.

Why this module exists: the source role (:mod:`migration_source`) turns successive
``get_migration_status`` samples into the Migration's ``status.progress`` (with a rate) and
a no-progress verdict, and, after a restart, decides from what the hypervisor says where a
Running migration stands (Ganeti's cleanup mode). Both are plain functions of the samples.
"""

from __future__ import annotations

import dataclasses
import enum

from kubehv.drivers import values


def progress_dict(
    status: values.MigrationStatus, rate_bytes_s: float | None = None
) -> dict[str, int]:
    result = {
        "memoryTotal": int(status.memory_total_bytes),
        "memoryProcessed": int(status.memory_processed_bytes),
        "memoryRemaining": int(status.memory_remaining_bytes),
        "percent": int(status.percent),
    }
    if status.disk_total_bytes:  # a storage migration: the disk copy is most of the bytes
        result["diskTotal"] = int(status.disk_total_bytes)
        result["diskProcessed"] = int(status.disk_processed_bytes)
        result["diskRemaining"] = int(status.disk_remaining_bytes)
    if rate_bytes_s is not None:
        result["rateBytesPerSecond"] = int(rate_bytes_s)
    return result


def final_figures(
    done: values.MigrationStatus, last_active: values.MigrationStatus | None
) -> values.MigrationStatus:
    """The figures of a completed copy: the hypervisor's own when it kept them, else those of
    the last sample taken while it ran (a domain that left the source has no job statistics,
    and zeros would overwrite the progress already shown)."""
    if done.memory_total_bytes or done.disk_total_bytes or last_active is None:
        return done
    return dataclasses.replace(last_active, state=done.state, message=done.message)


@dataclasses.dataclass
class ProgressTracker:
    """Turns successive MigrationStatus samples into a rate and a no-progress verdict."""

    stall_timeout_s: float
    last_processed: int = -1
    last_remaining: int = -1
    last_change_at: float | None = None
    last_sample_at: float | None = None
    rate_bytes_s: float | None = None

    def update(self, status: values.MigrationStatus, at: float) -> bool:
        """Record a sample taken at monotonic time ``at``; True if it shows progress.

        Memory and disk bytes count together: during a storage migration's disk copy the
        memory figures stand still, and that is progress, not a stall.
        """
        processed = status.memory_processed_bytes + status.disk_processed_bytes
        remaining = status.memory_remaining_bytes + status.disk_remaining_bytes
        moved = processed != self.last_processed or remaining != self.last_remaining
        if (
            self.last_sample_at is not None
            and self.last_processed >= 0
            and at > self.last_sample_at
        ):
            delta = processed - self.last_processed
            if delta >= 0:
                self.rate_bytes_s = delta / (at - self.last_sample_at)
        if moved or self.last_change_at is None:
            self.last_change_at = at
        self.last_processed = processed
        self.last_remaining = remaining
        self.last_sample_at = at
        return moved

    def stalled(self, at: float) -> bool:
        return self.last_change_at is not None and at - self.last_change_at > self.stall_timeout_s


# --- restart of the source agent (Ganeti's cleanup mode) -------------------------------------


class Recovery(enum.StrEnum):
    RESUME_WATCH = "ResumeWatch"  # the hypervisor still migrates: poll until it ends
    COMPLETED = "Completed"  # the instance left the source: go to Finalizing
    INTERRUPTED = "Interrupted"  # still on the source, no migration going on: Failed


def recover_running(alive_on_source: bool, status: values.MigrationStatus | None) -> Recovery:
    """Where does a Running migration stand after the source agent restarted?

    Ganeti's cleanup mode asks where the instance really runs. The source node knows whether
    its copy is alive and whether the hypervisor still has a migration job; the target's view
    is checked by the target agent in Finalizing (finalize_migration_dst fails if the
    instance did not arrive).
    """
    if status is not None and status.state is values.MigrationState.ACTIVE:
        return Recovery.RESUME_WATCH
    if status is not None and status.state is values.MigrationState.COMPLETED:
        return Recovery.COMPLETED
    if not alive_on_source:
        return Recovery.COMPLETED
    return Recovery.INTERRUPTED
