"""kubehv: a light Kubernetes operator that runs VMs through pluggable hypervisor drivers."""

__version__ = "0.1.0"
