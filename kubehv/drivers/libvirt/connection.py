"""One libvirt connection per node: open lazily, reconnect when dead, translate errors.

Why this module exists: libvirtd restarts, remote nodes go away, and a long-lived agent must
survive both without restarting itself. :class:`Connection` hands out a live ``virConnect``
(reopening it if the old one died) and turns "cannot talk to libvirtd" into the typed,
retryable :class:`~kubehv.drivers.errors.HypervisorUnavailable`. It also runs libvirt's
default event loop in a daemon thread (keepalive, and domain events such as reboot), and
probes whether KVM is really usable on the node.

A daemon that accepts but never answers (stopped, wedged) must not stall the agent for good:
every connection, local sockets included, runs libvirt's keepalive (a call in flight fails
after about :data:`KEEPALIVE` interval x (count + 1) seconds of silence instead of waiting
forever), and opening a connection has a deadline (:data:`OPEN_TIMEOUT_S`); libvirt has none.
"""

from __future__ import annotations

import contextlib
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import Any

import libvirt

from kubehv.drivers import errors
from kubehv.drivers.libvirt import domxml

DEFAULT_URI = "qemu:///system"

# Error codes that mean "the connection is gone", not "the request was wrong".
_CONNECTION_CODES = frozenset(
    {
        libvirt.VIR_ERR_SYSTEM_ERROR,
        libvirt.VIR_ERR_RPC,
        libvirt.VIR_ERR_NO_CONNECT,
        libvirt.VIR_ERR_INVALID_CONN,
        libvirt.VIR_ERR_AUTH_FAILED,
        libvirt.VIR_ERR_AUTH_UNAVAILABLE,
    }
)

KEEPALIVE = (5, 3)
"""(interval s, unanswered pings) of libvirt's client keepalive, on every connection."""

OPEN_TIMEOUT_S = 30.0
"""How long opening a connection may take before the daemon counts as unreachable."""

_loop_lock = threading.Lock()
_loop_started = False


def _silence(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; we raise typed errors instead."""


def ensure_event_loop() -> None:
    """Register and run libvirt's default event loop once per process (daemon thread)."""
    global _loop_started  # noqa: PLW0603 - one event loop per process, by libvirt's design
    with _loop_lock:
        if _loop_started:
            return
        libvirt.registerErrorHandler(_silence, None)
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _loop_started = True


class Opening:
    """One ``libvirt.open`` in its own thread, so that the caller can stop waiting for it.

    Every connection opened here runs keepalive. A caller that gave up may wait on the same
    attempt again later (no second thread for the same silent daemon); a connection nobody
    takes is closed when collected.
    """

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.done = threading.Event()
        self._conn: libvirt.virConnect | None = None
        self._error: libvirt.libvirtError | None = None
        threading.Thread(target=self._run, name="libvirt-open", daemon=True).start()

    def _run(self) -> None:
        try:
            conn = libvirt.open(self.uri)
            with contextlib.suppress(libvirt.libvirtError):  # the test driver has none
                conn.setKeepAlive(*KEEPALIVE)
            self._conn = conn
        except libvirt.libvirtError as exc:
            self._error = exc
        finally:
            self.done.set()

    def result(self, timeout_s: float) -> libvirt.virConnect:
        """The connection; :class:`errors.HypervisorUnavailable` if it failed or is late."""
        if not self.done.wait(timeout_s):
            raise errors.HypervisorUnavailable(
                f"libvirt at {self.uri} accepted the connection but did not answer within "
                f"{timeout_s:.0f} s; is libvirtd stopped or overloaded on this node?"
            )
        if self._error is not None or self._conn is None:
            detail = error_text(self._error) if self._error is not None else "no connection"
            raise errors.HypervisorUnavailable(
                f"cannot connect to libvirt at {self.uri}: {detail}; is libvirtd running and "
                "reachable on this node?"
            ) from self._error
        return self._conn


def open_within(uri: str) -> libvirt.virConnect:
    """``libvirt.open(uri)`` with keepalive and a deadline (:data:`OPEN_TIMEOUT_S`)."""
    return Opening(uri).result(OPEN_TIMEOUT_S)


def is_connection_error(exc: libvirt.libvirtError) -> bool:
    return exc.get_error_code() in _CONNECTION_CODES


def error_text(exc: libvirt.libvirtError) -> str:
    """libvirt's own message, without the 'libvirt:' prefixes it sometimes adds."""
    msg = exc.get_error_message() or str(exc)
    return msg.strip()


class Connection:
    """A reconnecting handle on one libvirt URI."""

    def __init__(self, uri: str | None) -> None:
        self.uri = uri or DEFAULT_URI
        self._conn: libvirt.virConnect | None = None
        self._lock = threading.RLock()
        self._kvm_usable: bool | None = None
        self._opening: Opening | None = None
        ensure_event_loop()

    def get(self) -> libvirt.virConnect:
        """A live connection; raises :class:`errors.HypervisorUnavailable` if unreachable."""
        with self._lock:
            if self._conn is not None and self._alive():
                return self._conn
            self._drop()
            if self._opening is None or self._opening.done.is_set():
                self._opening = Opening(self.uri)  # else: wait again for the one still pending
            opening = self._opening
            conn = opening.result(OPEN_TIMEOUT_S)
            self._opening = None
            self._conn = conn
            self._kvm_usable = None
            return conn

    @contextlib.contextmanager
    def dedicated(self) -> Iterator[libvirt.virConnect]:
        """A second, private connection for one long call (a migration).

        A migration blocks its connection for its whole duration, and on libvirt 9.0 other
        calls on that connection (domain state, info) wait behind it; the shared connection
        must stay free for progress polling, abort and everything else the agent does.
        """
        conn = open_within(self.uri)
        try:
            yield conn
        finally:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()

    def _alive(self) -> bool:
        conn = self._conn
        try:
            return conn is not None and bool(conn.isAlive())
        except libvirt.libvirtError:
            return False

    def close(self) -> None:
        with self._lock:
            self._drop()

    @contextlib.contextmanager
    def translated(self, what: str) -> Iterator[None]:
        """Turn connection-level libvirt errors raised inside into HypervisorUnavailable."""
        try:
            yield
        except libvirt.libvirtError as exc:
            # Closed under the call (keepalive timeout: an "internal error"): the connection
            # is gone whatever the code says.
            if is_connection_error(exc) or not self._alive():
                with self._lock:
                    self._drop()
                raise errors.HypervisorUnavailable(
                    f"lost libvirt at {self.uri} while trying to {what}: {error_text(exc)}"
                ) from exc
            raise

    # --- accelerator ---------------------------------------------------------------------

    def is_test_driver(self) -> bool:
        return self.uri.startswith("test:")

    def kvm_usable(self) -> bool:
        """Whether ``accelerator=auto`` may choose KVM on this node. When unsure: no.

        KVM must be offered by the node's libvirt (domain capabilities for virttype kvm,
        which libvirt only reports when the node's /dev/kvm works) AND the node must not be a
        virtual machine itself: nested KVM opens fine but guests hang at boot (measured on
        the machines this project runs on), and the host CPU's ``hypervisor`` feature in
        libvirt's capabilities tells us we are nested. Asking libvirt, not the local /proc,
        keeps the probe right for remote URIs. Set ``accelerator=kvm`` to override.
        """
        if self._kvm_usable is not None:
            return self._kvm_usable
        usable = False
        if not self.is_test_driver():
            conn = self.get()
            try:
                domcaps = conn.getDomainCapabilities(None, "x86_64", None, "kvm", 0)
                caps = conn.getCapabilities()
            except libvirt.libvirtError:
                domcaps, caps = "", ""
            if domcaps:
                usable = not _host_is_virtual(caps)
        self._kvm_usable = usable
        return usable

    def qemu_capabilities_problem(self) -> str | None:
        """None if this node can run QEMU (TCG at least) guests, else what is missing."""
        if self.is_test_driver():
            return None
        conn = self.get()
        try:
            conn.getDomainCapabilities(None, "x86_64", None, "qemu", 0)
        except libvirt.libvirtError as exc:
            return f"libvirt at {self.uri} cannot run x86_64 QEMU guests: {error_text(exc)}"
        return None


def _host_is_virtual(capabilities_xml: str) -> bool:
    try:
        root = domxml.parse(capabilities_xml)
    except ET.ParseError:
        return True  # unsure: say nested, so auto picks TCG
    names = {f.get("name") for f in root.findall("host/cpu/feature")}
    return "hypervisor" in names


def register_event(
    conn: libvirt.virConnect, dom: libvirt.virDomain, event_id: int, callback: Any
) -> int:
    """``domainEventRegisterAny`` with an ``(conn, dom, *args)`` callback; returns its id."""
    return int(conn.domainEventRegisterAny(dom, event_id, callback, None))
