"""The agent's part of real workloads: cloud-init user data from Secrets, guest addresses.

Why this module exists: the driver makes disks and the cloud-init seed from plain data; what
needs the Kubernetes API lives here. ``user_data`` reads ``cloudInit.userDataSecretRef`` (the
value goes into the driver's spec and from there only into the seed ISO, never into status,
Events or logs). :class:`AddressPublisher` copies the guest addresses the driver knows into
``status.interfaces`` (this agent is that field's only writer), polling because no event
announces a DHCP lease; it reads the owner's instances (:meth:`owner.Owner.instances`) and
writes only on change.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from kubehv import api
from kubehv.drivers import base, errors
from kubehv.operator import k8s, translate

log = logging.getLogger(__name__)


class SecretNotFound(errors.InvalidInstanceSpec):
    reason = "SecretNotFound"


async def user_data(kube: k8s.Kube, vi: api.VirtualInstance) -> str | None:
    """The user data from the Secret the spec names, or None when it names none."""
    ref = translate.user_data_secret_ref(vi)
    if ref is None:
        return None
    namespace = vi.metadata.namespace or ""
    try:
        secret = await k8s.call(kube.read_secret_key, namespace, ref[0], ref[1])
    except Exception as exc:
        if k8s.is_status(exc, 403):
            raise SecretNotFound(
                f"the kubehv agent may not read the cloud-init user data Secret {ref[0]!r} in "
                f"namespace {namespace} (forbidden by its RBAC)"
            ) from exc
        raise
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
