"""The driver registry: hypervisor name -> driver class, imported lazily.

Why this module exists: a manifest names its hypervisor (``spec.hypervisor: kvm``); the agent
and the webhook look the driver up here. Entries are import paths so that a process that
never uses libvirt never imports it.
"""

from __future__ import annotations

import importlib

from kubehv.drivers import base, errors, values

_DRIVERS: dict[str, str] = {
    "fake": "kubehv.drivers.fake:FakeHypervisor",
    "kvm": "kubehv.drivers.libvirt.driver:LibvirtHypervisor",
}


def register(name: str, import_path: str) -> None:
    """Add (or replace) a driver: ``import_path`` is ``"package.module:ClassName"``."""
    _DRIVERS[name] = import_path


def names() -> list[str]:
    return sorted(_DRIVERS)


def get_driver_class(name: str) -> type[base.BaseHypervisor]:
    path = _DRIVERS.get(name)
    if path is None:
        raise errors.UnknownDriver(
            f"unknown hypervisor {name!r}; known hypervisors: {', '.join(names())}"
        )
    module_name, _, cls_name = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise errors.UnknownDriver(
            f"hypervisor {name!r} cannot be loaded on this host: {exc}"
        ) from exc
    cls = getattr(module, cls_name)
    if not (isinstance(cls, type) and issubclass(cls, base.BaseHypervisor)):
        raise errors.UnknownDriver(f"{path} is not a BaseHypervisor subclass")
    return cls


def create_driver(name: str, config: values.DriverConfig) -> base.BaseHypervisor:
    return get_driver_class(name)(config)
