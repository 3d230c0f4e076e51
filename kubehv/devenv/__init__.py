"""A local development environment: control plane, libvirtd, netns nodes and the test guest.

Used by the tests, ``make demo`` and ``make bench``; never by the operator in production.
"""
