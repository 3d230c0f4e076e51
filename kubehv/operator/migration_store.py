"""Old name of the API access layer, kept for callers outside the operator (fault tests).

Why this module exists: the Migration protocol once had its own client wrapper; it is now
:mod:`kubehv.operator.k8s` (one wrapper, request timeouts, guarded writes). These names
point there so that nothing forks again.
"""

from __future__ import annotations

from kubehv.operator.k8s import Conflict, NotFound, call
from kubehv.operator.k8s import Kube as Store

__all__ = ["Conflict", "NotFound", "Store", "call"]
