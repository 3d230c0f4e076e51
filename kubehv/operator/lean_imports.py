"""Keep the ``kubernetes`` package out of the agent's and the controller's processes.

Why this module exists: kopf imports ``kubernetes.client`` on its own import when the package
is installed (only for isinstance checks on that package's model objects, which kubehv never
passes it), and that import alone is ~34 MB of generated model classes: a third of an agent's
memory budget at 1000 instances. kubehv's operator talks to the API through :mod:`rest`, so
the long-running processes mark the package as unimportable before kopf is loaded; kopf
then uses its own dummies, exactly as when the package is not installed. The package stays
installed for the cli and the devenv, which run in other processes.
"""

from __future__ import annotations

import sys

PACKAGE = "kubernetes"


def refuse_kube_client() -> None:
    """From now on ``import kubernetes`` raises ImportError in this process (a no-op if it
    was imported already: then this is not a process kubehv's entry point started)."""
    if PACKAGE not in sys.modules:
        sys.modules[PACKAGE] = None  # type: ignore[assignment]
