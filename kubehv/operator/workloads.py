"""The agent's part of real workloads: cloud-init user data, image downloads, guest addresses.

Why this module exists: the driver makes disks and the cloud-init seed from plain data; what
needs the Kubernetes API lives here. ``user_data`` reads ``cloudInit.userDataSecretRef`` (the
value goes into the driver's spec and from there only into the seed ISO, never into status,
Events or logs). :class:`ImageFetch` downloads an instance's images before its start and
shows the download in the ``ImagesReady`` condition (progress while it runs, the reason when
it fails). :class:`AddressPublisher` copies the guest addresses the driver knows into
``status.interfaces`` (this agent is that field's only writer), polling because no event
announces a DHCP lease; it reads the owner's instances (:meth:`owner.Owner.instances`) and
writes only on change.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from kubehv import api
from kubehv.drivers import base, errors, values
from kubehv.operator import k8s, secret_source, status, translate

log = logging.getLogger(__name__)


class SecretNotFound(errors.InvalidInstanceSpec):
    reason = "SecretNotFound"


async def user_data(secrets: secret_source.SecretSource, vi: api.VirtualInstance) -> str | None:
    """The user data from the Secret the spec names, or None when it names none.

    Read through the agent's Secret source: in a cluster the controller hands it over, and
    only to the node the instance is bound to (or the target of its open Migration).
    """
    ref = translate.user_data_secret_ref(vi)
    if ref is None:
        return None
    namespace = vi.metadata.namespace or ""
    try:
        secret = await secrets.read_secret_key(namespace, ref[0], ref[1])
    except secret_source.SecretRefused as exc:
        raise SecretNotFound(
            f"cannot read the cloud-init user data Secret {ref[0]!r} in namespace "
            f"{namespace}: {exc}"
        ) from exc
    if secret is None:
        raise SecretNotFound(
            f"cloud-init user data Secret {ref[0]!r} (key {ref[1]!r}) not found in namespace "
            f"{namespace}; create it and the instance starts"
        )
    try:
        return secret.decode()
    except UnicodeDecodeError:
        raise SecretNotFound(
            f"cloud-init user data in Secret {ref[0]!r} (key {ref[1]!r}) is not UTF-8 text"
        ) from None


COND_IMAGES = "ImagesReady"


def progress_message(p: values.ImageProgress) -> str:
    done = p.done_bytes >> 20
    if p.total_bytes:
        percent = 100 * p.done_bytes // p.total_bytes
        return f"downloading {p.url}: {done} of {p.total_bytes >> 20} MiB ({percent}%)"
    return f"downloading {p.url}: {done} MiB so far"


class ImageFetch:
    """The images of one start, fetched with their progress in ``ImagesReady``.

    The driver reports progress from its thread; every ``interval_s`` the latest report
    becomes the condition's message (written on change only). ``vi`` is the object as last
    written here, for the caller's next status write to build on.
    """

    def __init__(
        self,
        kube: k8s.Kube,
        driver: base.BaseHypervisor,
        vi: api.VirtualInstance,
        remember: Callable[[Mapping[str, Any]], None],
        interval_s: float = 2.0,
    ) -> None:
        self.kube = kube
        self.driver = driver
        self.vi = vi
        self.remember = remember
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._latest: values.ImageProgress | None = None

    def _report(self, progress: values.ImageProgress) -> None:
        with self._lock:
            self._latest = progress

    async def run(self, spec: values.InstanceSpec) -> None:
        """Fetch; raises the driver's error (a StorageError with its reason) after showing it."""
        if not any(d.source is values.DiskSource.IMAGE for d in spec.disks):
            return
        fetch = asyncio.ensure_future(
            k8s.call(self.driver.fetch_instance_images, spec, self._report)
        )
        while not fetch.done():
            await asyncio.wait({fetch}, timeout=self.interval_s)
            with self._lock:
                latest = self._latest
            if latest is not None and not fetch.done():
                await self._condition(False, "Downloading", progress_message(latest))
        try:
            fetch.result()
        except errors.HypervisorError as exc:
            await self._condition(False, exc.reason, exc.message)
            raise
        count = sum(d.source is values.DiskSource.IMAGE for d in spec.disks)
        await self._condition(True, "Cached", f"{count} image(s) verified in the node's cache")

    async def _condition(self, ok: bool, reason: str, message: str) -> None:
        st = self.vi.status
        current = next((c for c in st.conditions if c.type == COND_IMAGES), None)
        wanted = "True" if ok else "False"
        if current is not None and (current.status, current.reason, current.message) == (
            wanted,
            reason,
            message,
        ):
            return
        merged = status.merge_model_conditions(
            st.conditions, [status.Condition(COND_IMAGES, ok, reason, message)]
        )
        meta = self.vi.metadata
        try:
            body = await k8s.call(
                self.kube.patch_vi_status,
                meta.namespace or "",
                meta.name or "",
                {"conditions": merged},
            )
        except k8s.NotFound:
            return
        self.remember(body)
        self.vi = api.VirtualInstance.model_validate(body)


def interfaces_status(driver: base.BaseHypervisor, name: str) -> list[dict[str, Any]] | None:
    """status.interfaces: None (field removed) when there are none, and no empty lists.

    ``kubectl wait --for=jsonpath='{.status.interfaces[0].ipAddresses[0]}'`` keeps waiting
    while a field is absent but fails at once on an index into an empty list, so an address
    list appears only once it holds an address.
    """
    out: list[dict[str, Any]] = []
    for i in driver.get_instance_interfaces(name):
        entry: dict[str, Any] = {"name": i.name, "mac": i.mac}
        if i.ip_addresses:
            entry["ipAddresses"] = list(i.ip_addresses)
        out.append(entry)
    return out or None


def _published(vi: api.VirtualInstance) -> list[dict[str, Any]] | None:
    """status.interfaces as the object holds it (the wire form of :func:`interfaces_status`)."""
    return [i.to_dict() for i in vi.status.interfaces or []] or None


_SHOWN = (api.virtualinstance.Phase.RUNNING, api.virtualinstance.Phase.PAUSED)


class AddressPublisher:
    """Every ``interval_s``: status.interfaces of this node's running instances, on change."""

    def __init__(
        self,
        kube: k8s.Kube,
        driver: base.BaseHypervisor,
        instances: Callable[[], Mapping[str, api.VirtualInstance]],
        remember: Callable[[Mapping[str, Any]], None],
        interval_s: float = 2.0,
    ) -> None:
        self.kube = kube
        self.driver = driver
        self.instances = instances
        self.remember = remember
        self.interval_s = interval_s

    async def publish_once(self) -> None:
        for vi in list(self.instances().values()):
            st = vi.status
            if vi.metadata.deletion_timestamp or st.phase is api.virtualinstance.Phase.MIGRATING:
                continue
            wanted: list[dict[str, Any]] | None = None
            if st.phase in _SHOWN:
                name = translate.instance_name(vi)
                try:
                    wanted = await k8s.call(interfaces_status, self.driver, name)
                except errors.HypervisorError as exc:
                    log.debug("addresses of %s: %s", name, exc.message)
                    continue
            if wanted == _published(vi):
                continue
            ns, name = vi.metadata.namespace or "", vi.metadata.name or ""
            try:
                result = await k8s.call(self.kube.patch_vi_status, ns, name, {"interfaces": wanted})
            except Exception as exc:
                if k8s.is_status(exc, 404):
                    continue
                raise
            self.remember(result)

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.publish_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("guest address pass failed; will try again")
