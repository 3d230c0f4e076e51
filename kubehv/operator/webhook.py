"""The validating admission webhook: the driver's cluster-side checks at the API's door.

Why this module exists: a VirtualInstance with an unknown or malformed hypervisor parameter
should be refused by ``kubectl apply`` with the driver's own message, not accepted and
failed later on a node. :func:`problems` is the pure check (driver class lookup,
``check_instance_spec``, which includes ``check_parameter_syntax``); :func:`register` wires it
into kopf (``kopf.on.validate``). Node-side checks (files present, KVM usable) stay in the
agent: the webhook does no I/O. Two ways to serve it: in a cluster (``KUBEHV_WEBHOOK_SECRET``
set by the Deployment) every replica, leader or standby, runs an :class:`AdmissionServer` on
every interface with the certificate :mod:`webhook_certs` keeps, for the configuration the
manifests install (path ``/virtualinstance``), from before leader election on; elsewhere
:func:`self_signed` makes a throw-away certificate for a loopback server whose configuration
kopf manages on the leader (tests, the demo: one URL, so one server).
"""

from __future__ import annotations

import atexit
import datetime
import http.server
import json
import logging
import os
import shutil
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import kopf
import pydantic

from kubehv import api
from kubehv.api import constants
from kubehv.drivers import errors
from kubehv.drivers import registry as driver_registry
from kubehv.operator import health, rest, translate, webhook_certs

log = logging.getLogger(__name__)

Route = Callable[[Mapping[str, str], bytes], tuple[int, dict[str, Any]]]
"""Another POST path on the webhook's HTTPS server: (headers with lower-case names, body)
-> (code, JSON body)."""


def problems(body: Mapping[str, Any]) -> str | None:
    """Why this VirtualInstance is refused, or ``None`` if it passes the driver's checks.

    The object is parsed into the api model first (the one way the runtime reads objects);
    a body the model refuses is refused with the model's message.
    """
    try:
        vi = api.VirtualInstance.model_validate(dict(body))
    except pydantic.ValidationError as exc:
        return f"invalid VirtualInstance: {exc.errors()[0].get('msg', exc)}"
    if vi.metadata.deletion_timestamp:
        return None  # being deleted: nothing to check
    try:
        cls = driver_registry.get_driver_class(vi.spec.hypervisor or "kvm")
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
        constants.GROUP,
        constants.PLURAL_VI,
        registry=registry,
        id="virtualinstance",
        operations=["CREATE", "UPDATE"],
    )
    def validate_vi(body: kopf.Body, **_: Any) -> None:
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


def cluster_keeper(api_client: rest.Client) -> webhook_certs.Keeper | None:
    """The certificate keeper when running in a cluster, with a usable pair already on disk.

    Blocks (retrying every few seconds, saying why) until the Secret gives a certificate:
    with cert-manager, it may not have issued one yet. None outside a cluster.
    """
    directory = Path(tempfile.mkdtemp(prefix="kubehv-webhook-"))
    atexit.register(shutil.rmtree, directory, True)
    settings = webhook_certs.CertSettings.from_env(os.environ, directory)
    if settings is None:
        return None
    keeper = webhook_certs.Keeper(settings, api_client)
    while True:
        try:
            keeper.sync()
            return keeper
        except Exception as exc:
            log.warning("no webhook certificate yet (%s); retrying", exc)
            time.sleep(min(5.0, settings.check_interval_s))


class AdmissionServer:
    """The in-cluster webhook: HTTPS in daemon threads, independent of kopf and of the Lease.

    Other POST paths (``routes``: the Secret hand-over) share its port and certificate.
    Every controller replica runs one from its start, so the Service always has a Ready
    endpoint and the webhook keeps answering across a leader change (the check is stateless:
    :func:`problems`). The certificate comes from the :class:`webhook_certs.Keeper`, re-synced
    on a timer; a new pair is loaded into a fresh TLS context that the next connection uses.
    """

    def __init__(
        self,
        keeper: webhook_certs.Keeper,
        port: int,
        addr: str = "0.0.0.0",  # noqa: S104
        routes: Mapping[str, Route] | None = None,
    ) -> None:
        self.keeper, self.port, self.addr = keeper, port, addr
        self.routes = dict(routes or {})
        self._context = self._load()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._stop = threading.Event()

    def _load(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(self.keeper.certfile), str(self.keeper.keyfile))
        return ctx

    def serving(self) -> str | None:
        """None when the server answers (a readiness check)."""
        return None if self._server is not None else "webhook server not started"

    def start(self) -> None:
        outer = self

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def get_request(self) -> tuple[Any, Any]:
                sock, addr = self.socket.accept()
                # The handshake happens in the handler's thread (first read).
                wrapped = outer._context.wrap_socket(
                    sock, server_side=True, do_handshake_on_connect=False
                )
                return wrapped, addr

        class Handler(health.QuietHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                route = outer.routes.get(self.path.split("?", 1)[0])
                if route is not None:  # e.g. the Secret hand-over (secret_handover)
                    headers = {k.lower(): v for k, v in self.headers.items()}
                    code, doc = route(headers, self.rfile.read(min(length, 65536)))
                    self.reply(code, json.dumps(doc).encode(), "application/json")
                    return
                try:
                    review = json.loads(self.rfile.read(length) or b"{}")
                    answer = review_response(review)
                    code = 200
                except ValueError as exc:
                    answer, code = {"error": f"not an AdmissionReview: {exc}"}, 400
                self.reply(code, json.dumps(answer).encode(), "application/json")

        self._server = Server((self.addr, self.port), Handler)
        threading.Thread(target=self._server.serve_forever, name="webhook", daemon=True).start()
        threading.Thread(target=self._renew_forever, name="webhook-certs", daemon=True).start()
        log.info("webhook serving on %s:%s", self.addr, self.port)

    def _renew_forever(self) -> None:
        while not self._stop.wait(self.keeper.settings.check_interval_s):
            try:
                if self.keeper.sync():
                    self._context = self._load()
                    log.info("webhook certificate reloaded")
            except Exception:
                log.exception("webhook certificate check failed; will retry")

    def close(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def review_response(review: Mapping[str, Any]) -> dict[str, Any]:
    """The AdmissionReview answer for a request (CREATE/UPDATE of a VirtualInstance)."""
    request = review.get("request")
    if not isinstance(request, Mapping):
        raise ValueError("no request")
    obj = request.get("object")
    response: dict[str, Any] = {"uid": request.get("uid", ""), "allowed": True}
    if isinstance(obj, Mapping):
        why = problems(obj)
        if why:
            response = {**response, "allowed": False, "status": {"code": 422, "message": why}}
    return {
        "apiVersion": review.get("apiVersion", "admission.k8s.io/v1"),
        "kind": "AdmissionReview",
        "response": response,
    }
