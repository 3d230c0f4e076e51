"""Storage failures, each with a reason a person understands (it becomes the condition reason).

Why this module exists: a wrong checksum, an unreachable URL or a disk path that belongs to
someone else must end as a status condition that says so -- not a stack trace -- and the
operator tells retryable from final failures by class, never by parsing messages.
"""

from __future__ import annotations

from kubehv.drivers import errors


class StorageError(errors.HypervisorError):
    reason = "DiskError"


class ImageDownloadFailed(StorageError):
    """The URL could not be fetched (unreachable, HTTP error, cut short); retrying may help."""

    reason = "ImageDownloadFailed"
    retryable = True


class ImageChecksumMismatch(StorageError):
    reason = "ImageChecksumMismatch"


class ImageTooLarge(StorageError):
    reason = "ImageTooLarge"


class ImageRefused(StorageError):
    """The image is not something we run: an external backing file, an unknown format."""

    reason = "ImageRefused"


class DiskPathForbidden(StorageError):
    reason = "DiskPathForbidden"


class DiskCreateFailed(StorageError):
    reason = "DiskCreateFailed"


class CloudInitError(StorageError):
    reason = "CloudInitInvalid"
