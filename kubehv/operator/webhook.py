"""The validating admission webhook: the driver's cluster-side checks at the API's door.

Why this module exists: a VirtualInstance with an unknown or malformed hypervisor parameter
should be refused by ``kubectl apply`` with the driver's own message, not accepted and
failed later on a node. :func:`problems` is the pure check (driver class lookup,
``check_instance_spec``, which includes ``check_parameter_syntax``); :func:`register` wires it
into kopf (``kopf.on.validate``). Node-side checks (files present, KVM usable) stay in the
agent: the webhook does no I/O. Two ways to serve it: in a cluster (``KUBEHV_WEBHOOK_SECRET``
set by the Deployment) :func:`serve_in_cluster` listens on every interface with the
certificate :mod:`webhook_certs` keeps, for the configuration the manifests install (path
``/virtualinstance``, the handler id); elsewhere :func:`self_signed` makes a throw-away
certificate for a loopback server whose configuration kopf manages (tests, the demo).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import datetime
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import kopf
import kubernetes

from kubehv.drivers import errors
from kubehv.drivers import registry as driver_registry
from kubehv.operator import k8s, translate, webhook_certs

log = logging.getLogger(__name__)


def problems(vi: Mapping[str, Any]) -> str | None:
    """Why this VirtualInstance is refused, or ``None`` if it passes the driver's checks."""
    spec = vi.get("spec") or {}
    hypervisor = str(spec.get("hypervisor") or "kvm")
    try:
        cls = driver_registry.get_driver_class(hypervisor)
    except errors.UnknownDriver as exc:
        return exc.message
    try:
        instance = translate.instance_spec(vi)
        cls.check_instance_spec(instance)
    except errors.HypervisorError as exc:
        return exc.message
    except ValueError as exc:
        return str(exc)
    return None


def register(registry: kopf.OperatorRegistry) -> None:
    @kopf.on.validate(
        k8s.GROUP,
        k8s.VI_PLURAL,
        registry=registry,
        id="virtualinstance",
        operations=["CREATE", "UPDATE"],
    )
    def validate_vi(body: kopf.Body, **_: Any) -> None:
        if (body.get("metadata") or {}).get("deletionTimestamp"):
            return
        why = problems(dict(body))
        if why:
            raise kopf.AdmissionError(why, code=422)


def self_signed(directory: str, host: str) -> tuple[str, str, bytes]:
    """(certfile, keyfile, CA PEM) for a loopback server on ``host`` (an IP or a DNS name):
    a throw-away CA and a certificate for ``host`` signed by it (webhook_certs' rules)."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca, ca_key = webhook_certs.make_ca(now, days=365)
    cert, key = webhook_certs.make_serving(ca, ca_key, (host,), now, days=365)
    certfile = os.path.join(directory, "webhook.crt")
    keyfile = os.path.join(directory, "webhook.key")
    webhook_certs.write_private(Path(certfile), cert)
    webhook_certs.write_private(Path(keyfile), key)
    return certfile, keyfile, ca


def cluster_keeper(api_client: Any) -> webhook_certs.Keeper | None:
    """The certificate keeper when running in a cluster, with a usable pair already on disk.

    Blocks (retrying every few seconds, saying why) until the Secret gives a certificate:
    with cert-manager, it may not have issued one yet. None outside a cluster.
    """
    directory = Path(tempfile.mkdtemp(prefix="kubehv-webhook-"))
    atexit.register(shutil.rmtree, directory, True)
    settings = webhook_certs.CertSettings.from_env(os.environ, directory)
    if settings is None:
        return None
    keeper = webhook_certs.Keeper(
        settings,
        kubernetes.client.CoreV1Api(api_client),
        kubernetes.client.AdmissionregistrationV1Api(api_client),
    )
    while True:
        try:
            keeper.sync()
            return keeper
        except Exception as exc:
            log.warning("no webhook certificate yet (%s); retrying", exc)
            time.sleep(min(5.0, settings.check_interval_s))


def serve_in_cluster(
    registry: kopf.OperatorRegistry, keeper: webhook_certs.Keeper, port: int
) -> None:
    """kopf's web server on every interface with the kept certificate, re-checked on a timer
    (kopf reloads the files when they change)."""
    interval = keeper.settings.check_interval_s
    tasks: list[asyncio.Task[None]] = []

    async def renew_forever() -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await asyncio.to_thread(keeper.sync)
            except Exception:
                log.exception("webhook certificate check failed; will retry")

    @kopf.on.startup(registry=registry, id="webhook-server")
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.admission.server = kopf.WebhookServer(
            addr="0.0.0.0",  # noqa: S104 - the Service reaches the pod on its own address
            port=port,
            certfile=str(keeper.certfile),
            pkeyfile=str(keeper.keyfile),
            file_check_interval=interval,
        )

    @kopf.on.startup(registry=registry, id="webhook-certificates")
    async def start(**_: Any) -> None:
        tasks.append(asyncio.create_task(renew_forever(), name="webhook-certificates"))

    @kopf.on.cleanup(registry=registry, id="webhook-certificates-stop")
    async def stop(**_: Any) -> None:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
