"""The ``kvm`` hypervisor driver: QEMU guests run by libvirt.

Why this package exists: it is the driver that runs real VMs. It is split by concern --
``params`` (hypervisor parameters and node-level settings), ``domxml`` (the domain XML
builder, covered by golden files), ``connection`` (one libvirt connection per node, reconnect,
error translation, accelerator probe), ``migration`` (peer-to-peer migration, progress,
abort) and ``driver`` (the :class:`~kubehv.drivers.base.BaseHypervisor` implementation).
``import libvirt`` happens only inside this package.
"""
