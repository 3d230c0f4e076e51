"""What the owner model's adapters share: typed views of the frozen world, guarded steps.

Why this module exists: the agent's owner (:mod:`adapter_owner`), the migration roles
(:mod:`adapter_roles`) and the controller (:mod:`adapter_controller`) all read the model's
objects as kubehv reads API objects — through ``kubehv.api`` models, parsed once per
distinct object — and end a step the way kubehv's loops do when a handler raises (logged,
tried again later).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

from kubehv import api
from kubehv.drivers import errors
from kubehv.operator import migration_logic as ml
from tests.model.sim import Sim, mig_body, vi_body
from tests.model.world import Conflict, NotFound, Obj

Step = Callable[[Sim], None]
FAILED_STEP = (Conflict, NotFound, errors.HypervisorError, ValueError)
"""What the glue raises and its callers log (the owner's ``_drive``, resync loops)."""


def guard(fn: Step) -> Step:
    def step(sim: Sim) -> None:
        with contextlib.suppress(*FAILED_STEP):
            fn(sim)

    return step


def _call(fn: Callable[..., None], args: tuple[Any, ...], sim: Sim) -> None:
    fn(sim, *args)


def on(fn: Callable[..., None], *args: Any) -> Step:
    """A guarded step calling ``fn(sim, *args)``."""
    return guard(functools.partial(_call, fn, args))


@functools.lru_cache(maxsize=65536)
def vi_model(obj: Obj | None) -> api.VirtualInstance | None:
    """The typed model of a (frozen) VirtualInstance; parsed once per distinct object."""
    return None if obj is None else api.VirtualInstance.model_validate(vi_body(obj))


@functools.lru_cache(maxsize=65536)
def mig_model(obj: Obj) -> api.Migration:
    return api.Migration.model_validate(mig_body(obj))


def nodes(sim: Sim) -> list[api.NodeHypervisor]:
    return [api.NodeHypervisor.model_validate(b) for b in sim.node_bodies()]


def reread(sim: Sim) -> ml.MigrationView:
    body = sim.get_mig()
    if body is None:
        raise NotFound("migration")
    return ml.MigrationView.from_body(body)


def mwrite(sim: Sim, patch: dict[str, Any]) -> ml.MigrationView:
    return ml.MigrationView.from_body(sim.patch_mig(patch))
