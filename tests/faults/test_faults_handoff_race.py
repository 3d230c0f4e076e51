"""Two writers racing on a Migration hand-off: the resourceVersion guard lets exactly one win.

Why: every hand-off of the Migration protocol (controller schedules, source claims Running,
...) is a status merge patch carrying the resourceVersion the writer read. If two processes
act on the same stale read (a restarted agent and its replacement, two controllers across a
leader change), the API server must accept one patch and answer 409 to the other, which the
operator's own write helper (:class:`kubehv.operator.k8s.Kube`) surfaces as the
typed ``Conflict``. Each writer has its own API client, as separate processes would.
"""

from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest

from kubehv.api import constants
from kubehv.operator import k8s as ms
from kubehv.operator import migration_logic as ml

pytestmark = [pytest.mark.apiserver, pytest.mark.faults]


def _create_migration(store: ms.Kube, namespace: str) -> dict[str, Any]:
    body = {
        "apiVersion": f"{constants.GROUP}/{constants.VERSION}",
        "kind": "Migration",
        "metadata": {"name": f"race-{uuid.uuid4().hex[:6]}"},
        "spec": {"instance": "nobody"},
    }
    return store.create_migration(namespace, body)


def _race(
    stores: list[ms.Kube], view: ml.MigrationView, patches: list[dict[str, Any]]
) -> list[Any]:
    """Send one patch per store at the same moment; return each one's result or exception."""
    results: list[Any] = [None] * len(stores)
    barrier = threading.Barrier(len(stores))

    def write(i: int) -> None:
        barrier.wait()
        try:
            results[i] = stores[i].patch_migration_status(view, patches[i])
        except Exception as exc:  # the outcome under test
            results[i] = exc

    threads = [threading.Thread(target=write, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


@pytest.mark.parametrize("round_", range(5))
def test_two_schedulers_on_a_stale_read_one_wins(
    control_plane: Any, crds_installed: Any, namespace: str, round_: int
) -> None:
    clients = [ms.load_api_client(str(control_plane.kubeconfig)) for _ in range(2)]
    try:
        stores = [ms.Kube(c) for c in clients]
        body = _create_migration(stores[0], namespace)
        view = ml.MigrationView.from_body(body)  # the same read, for both writers
        patches = [
            ml.transition(view, ml.Phase.SCHEDULED, {"sourceNode": "src", "targetNode": tgt})
            for tgt in ("winner-a", "winner-b")
        ]
        results = _race(stores, view, patches)

        won = [r for r in results if isinstance(r, dict)]
        lost = [r for r in results if isinstance(r, ms.Conflict)]
        assert len(won) == 1 and len(lost) == 1, results
        final = stores[0].get_migration(namespace, view.name)
        assert final["status"]["phase"] == "Scheduled"
        assert final["status"]["targetNode"] == won[0]["status"]["targetNode"]
        assert final["metadata"]["resourceVersion"] == won[0]["metadata"]["resourceVersion"]
    finally:
        for c in clients:
            c.close()


def test_loser_rereads_and_sees_the_winner(
    control_plane: Any, crds_installed: Any, namespace: str
) -> None:
    """The documented recovery: after Conflict, re-read; the next legal step starts from there."""
    client = ms.load_api_client(str(control_plane.kubeconfig))
    try:
        store = ms.Kube(client)
        view = ml.MigrationView.from_body(_create_migration(store, namespace))
        store.patch_migration_status(view, ml.transition(view, ml.Phase.SCHEDULED))
        with pytest.raises(ms.Conflict):
            store.patch_migration_status(
                view, ml.fail(view, "a stale writer must not overwrite Scheduled")
            )
        fresh = ml.MigrationView.from_body(store.get_migration(namespace, view.name))
        assert fresh.phase is ml.Phase.SCHEDULED and not fresh.failure_reason
        with pytest.raises(ValueError, match="illegal"):
            ml.transition(fresh, ml.Phase.RUNNING)
        store.patch_migration_status(fresh, ml.transition(fresh, ml.Phase.PREPARING))
        assert store.get_migration(namespace, view.name)["status"]["phase"] == "Preparing"
    finally:
        client.close()
