"""Shared pieces of the bench: percentiles, a watch that time-stamps phases, apiserver writes.

Why a watch and not polling: polling hundreds of objects would load the very API server whose
latency we measure; one watch per namespace sees every transition once, time-stamped on
arrival (``time.time()``, the same clock the creators use).
"""

from __future__ import annotations

import re
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import kubernetes

GROUP, VERSION = "kubehv.io", "v1alpha1"
WRITE_VERBS = ("POST", "PUT", "PATCH")
_ROOT: list[Path] = []


def workdir(name: str) -> Path:
    """A folder for one section's logs and state, under the run's one temporary folder."""
    if not _ROOT:
        _ROOT.append(Path(tempfile.mkdtemp(prefix="kubehv-bench-")))
    path = _ROOT[0] / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def remove_workdirs() -> None:
    while _ROOT:
        shutil.rmtree(_ROOT.pop(), ignore_errors=True)


def root_dir() -> Path | None:
    return _ROOT[0] if _ROOT else None


def pct(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0..100), nearest-rank on the sorted values; NaN when empty."""
    data = sorted(values)
    if not data:
        return float("nan")
    rank = max(1, round(q / 100.0 * len(data) + 0.4999))
    return data[min(rank, len(data)) - 1]


def median(values: Iterable[float]) -> float:
    data = list(values)
    return statistics.median(data) if data else float("nan")


def phase_is(phase: str) -> Callable[[Mapping[str, Any]], bool]:
    return lambda obj: (obj.get("status") or {}).get("phase") == phase


class Watcher:
    """Watches one plural in one namespace; ``seen[name]`` = first time ``predicate`` held."""

    def __init__(
        self,
        api: Any,
        namespace: str,
        plural: str,
        predicate: Callable[[Mapping[str, Any]], bool],
    ) -> None:
        self.custom = kubernetes.client.CustomObjectsApi(api)
        self.namespace, self.plural, self.predicate = namespace, plural, predicate
        self.seen: dict[str, float] = {}
        self.last: dict[str, Mapping[str, Any]] = {}
        # name -> first time each (phase, nodeName) pair was seen: where the time goes
        self.history: dict[str, dict[tuple[str, str], float]] = {}
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._watch: Any = None
        self._thread = threading.Thread(target=self._run, name=f"watch-{plural}", daemon=True)

    def __enter__(self) -> Watcher:
        listing: Any = self.custom.list_namespaced_custom_object(
            GROUP, VERSION, self.namespace, self.plural
        )
        self._rv = listing["metadata"]["resourceVersion"]
        for obj in listing.get("items") or []:
            self._see(obj)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()
        self._thread.join(timeout=5)

    def _see(self, obj: Mapping[str, Any]) -> None:
        name = str(obj["metadata"]["name"])
        st = obj.get("status") or {}
        step = (str(st.get("phase") or ""), str(st.get("nodeName") or ""))
        with self._cond:
            self.last[name] = obj
            self.history.setdefault(name, {}).setdefault(step, time.time())
            if name not in self.seen and self.predicate(obj):
                self.seen[name] = time.time()
                self._cond.notify_all()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._watch = kubernetes.watch.Watch()  # type: ignore[no-untyped-call]
            try:
                for event in self._watch.stream(
                    self.custom.list_namespaced_custom_object,
                    GROUP, VERSION, self.namespace, self.plural,
                    resource_version=self._rv, timeout_seconds=60,
                ):  # fmt: skip
                    obj = event["object"]
                    self._rv = obj["metadata"]["resourceVersion"]
                    if event["type"] in ("ADDED", "MODIFIED"):
                        self._see(obj)
                    if self._stop.is_set():
                        return
            except Exception:
                if self._stop.is_set():
                    return
                time.sleep(0.2)
                listing: Any = self.custom.list_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, self.plural
                )
                self._rv = listing["metadata"]["resourceVersion"]
                for obj in listing.get("items") or []:
                    self._see(obj)

    def placed_at(self, name: str) -> float | None:
        """When the object was first seen with a node assigned (the controller's placement)."""
        times = [t for (_phase, node), t in self.history.get(name, {}).items() if node]
        return min(times) if times else None

    def wait(self, names: Iterable[str], timeout: float) -> dict[str, float]:
        """Wait until every name was seen; raise TimeoutError naming the missing ones."""
        wanted = set(names)
        deadline = time.monotonic() + timeout
        with self._cond:
            while not wanted <= self.seen.keys():
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(wanted - self.seen.keys())
                    sample = {n: (self.last.get(n) or {}).get("status") for n in missing[:3]}
                    raise TimeoutError(f"{len(missing)} not reached in {timeout}s: {sample}")
                self._cond.wait(min(left, 1.0))
            return {n: self.seen[n] for n in wanted}


_SAMPLE = re.compile(r"^apiserver_request_total\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)$")
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def write_counts(metrics_text: str) -> dict[tuple[str, str, str], float]:
    """(resource, subresource, verb) -> apiserver_request_total, writes only, all codes."""
    return request_counts(metrics_text, WRITE_VERBS)


def request_counts(metrics_text: str, verbs: Iterable[str]) -> dict[tuple[str, str, str], float]:
    """(resource, subresource, verb) -> apiserver_request_total for ``verbs``, all codes."""
    wanted = set(verbs)
    out: dict[tuple[str, str, str], float] = {}
    for line in metrics_text.splitlines():
        m = _SAMPLE.match(line)
        if not m:
            continue
        labels = dict(_LABEL.findall(m.group("labels")))
        verb = labels.get("verb", "")
        if verb not in wanted:
            continue
        key = (labels.get("resource", ""), labels.get("subresource", ""), verb)
        out[key] = out.get(key, 0.0) + float(m.group("value"))
    return out


def delta(
    before: Mapping[tuple[str, str, str], float], after: Mapping[tuple[str, str, str], float]
) -> dict[str, int]:
    """Per ``resource[/subresource] VERB`` increase between two snapshots (nonzero only)."""
    out: dict[str, int] = {}
    for key, value in after.items():
        d = int(value - before.get(key, 0.0))
        if d:
            res, sub, verb = key
            out[f"{res}{'/' + sub if sub else ''} {verb}"] = d
    return dict(sorted(out.items()))
