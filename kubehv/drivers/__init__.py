"""Hypervisor drivers: the contract, value objects, errors, and the fake and libvirt drivers."""
