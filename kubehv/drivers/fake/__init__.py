"""The ``fake`` hypervisor driver (registry name ``fake``): VMs as files, for tests.

Why this package exists: see :mod:`kubehv.drivers.fake.driver`. The registry imports
``kubehv.drivers.fake:FakeHypervisor``; :func:`crash_instance` and
:func:`add_foreign_instance` let tests poke a fake node from outside its agent.
"""

from kubehv.drivers.fake.driver import FakeHypervisor, add_foreign_instance, crash_instance

__all__ = ["FakeHypervisor", "add_foreign_instance", "crash_instance"]
