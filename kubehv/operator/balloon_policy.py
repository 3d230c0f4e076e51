"""The auto-balloon policy: from guest statistics and node pressure to one target per guest.

Why this module exists: picking balloon targets is the whole of auto-ballooning, and it must
be right before anything acts on it -- a target too low starves a guest, targets that chase
each other make balloons oscillate. So the decision is one pure function,
:func:`decide`, tested by table (``tests/balloon/test_policy.py``); the agent's loop
(:mod:`kubehv.operator.balloon_loop`) only gathers its inputs and applies its output.

The rules, per interval:

* A guest is **hungry** when it uses memory faster than it has it: its free (``usable``)
  memory is below ``low_free`` while its use grew since the last look, or its major faults
  grew. Hungry is kept (state in :class:`GuestState`) until the guest has ``headroom`` free
  again or stops using more, so a guest that waits for memory is not forgotten.
  A hungry guest wants ``used + 2 * headroom`` at once (bounded by ``grow_step_mib``).
* An idle guest under **pressure** (host ``MemAvailable`` low, PSI memory ``some avg10``
  high, or the guests above the node's guest-memory cap) shrinks toward
  ``used + headroom`` by at most ``shrink_step_mib``; without pressure it keeps what it has.
* The sum of targets stays within the **budget**: the cap minus the memory of guests that
  are not auto-ballooned, and what the host can still give. To make room, idle guests give
  up first what they do not use (down to ``used + headroom``), then down to their ``min``;
  hungry guests get what is left, the most squeezed first.
* **Never** below ``min`` or above ``max``; moves smaller than ``hysteresis_mib`` are not
  made (except to get back into ``[min, max]``); a guest that grew is not shrunk again
  within ``shrink_cooldown_s``.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping, Sequence

from kubehv.drivers import values


@dataclasses.dataclass(frozen=True, slots=True)
class Knobs:
    """Tuning of the policy (MiB and seconds). Defaults suit small guests."""

    headroom_mib: int = 64
    low_free_mib: int = 40
    grow_step_mib: int = 256
    shrink_step_mib: int = 64
    hysteresis_mib: int = 8
    use_rise_mib: int = 4
    shrink_cooldown_s: float = 30.0
    host_reserve_mib: int = 256
    pressure_available_mib: int = 512
    psi_some_avg10: float = 10.0
    large_move_mib: int = 64


@dataclasses.dataclass(frozen=True, slots=True)
class Guest:
    """One auto-ballooned guest: its bounds and its latest balloon statistics."""

    name: str
    min_mib: int
    max_mib: int
    stats: values.MemoryStats


@dataclasses.dataclass(frozen=True, slots=True)
class GuestState:
    """What the policy remembers about a guest between intervals (returned by decide)."""

    used_mib: int | None = None
    major_faults: int | None = None
    hungry: bool = False
    last_grow_s: float | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Node:
    """The node's side: host memory, pressure, and the cap on guest memory.

    ``cap_mib`` is the node's guest-memory cap (``None``: no cap); ``fixed_guests_mib`` is
    what guests that are not auto-ballooned hold (they count against the cap).
    """

    mem_available_mib: int
    psi_some_avg10: float | None = None
    cap_mib: int | None = None
    fixed_guests_mib: int = 0


class Why(enum.StrEnum):
    KEEP = "Keep"
    GROW = "Hungry"
    SHRINK = "Idle"
    GIVE_WAY = "GiveWay"
    BOUNDS = "Bounds"
    UNREPORTED = "NoStats"


@dataclasses.dataclass(frozen=True, slots=True)
class Target:
    """The policy's answer for one guest: the memory to balloon to, and why."""

    target_mib: int
    actual_mib: int
    why: Why
    state: GuestState

    @property
    def move_mib(self) -> int:
        return self.target_mib - self.actual_mib


@dataclasses.dataclass(frozen=True, slots=True)
class Outcome:
    targets: dict[str, Target]
    pressure: bool
    budget_mib: int


def under_pressure(node: Node, guests_actual_mib: int, knobs: Knobs) -> bool:
    """Whether the node wants memory back from idle guests."""
    if node.mem_available_mib < knobs.pressure_available_mib:
        return True
    if node.psi_some_avg10 is not None and node.psi_some_avg10 >= knobs.psi_some_avg10:
        return True
    return node.cap_mib is not None and node.fixed_guests_mib + guests_actual_mib > node.cap_mib


def budget(node: Node, guests_actual_mib: int, knobs: Knobs) -> int:
    """The most memory the auto-ballooned guests may hold together after this interval."""
    host = guests_actual_mib + node.mem_available_mib - knobs.host_reserve_mib
    if node.cap_mib is None:
        return max(0, host)
    return max(0, min(host, node.cap_mib - node.fixed_guests_mib))


def _clamp(value: int, guest: Guest) -> int:
    return max(guest.min_mib, min(guest.max_mib, value))


def _hungry(guest: Guest, prev: GuestState, knobs: Knobs) -> bool:
    stats = guest.stats
    used, usable = stats.used_mib, stats.usable_mib
    if used is None or usable is None:
        return False
    faulting = (
        prev.major_faults is not None
        and stats.major_faults is not None
        and stats.major_faults > prev.major_faults
    )
    rising = prev.used_mib is not None and used - prev.used_mib >= knobs.use_rise_mib
    if faulting or (rising and usable < knobs.low_free_mib):
        return True
    if prev.hungry:
        dropped = prev.used_mib is not None and used < prev.used_mib - knobs.use_rise_mib
        satisfied = usable >= knobs.headroom_mib
        return not (dropped or satisfied)
    return False


def decide(
    guests: Sequence[Guest],
    node: Node,
    states: Mapping[str, GuestState],
    now: float,
    knobs: Knobs | None = None,
) -> Outcome:
    """One target per guest (see the module docstring for the rules)."""
    k = knobs or Knobs()
    actual_total = sum(g.stats.actual_mib for g in guests)
    pressure = under_pressure(node, actual_total, k)
    room = budget(node, actual_total, k)
    want: dict[str, int] = {}
    floor: dict[str, int] = {}
    why: dict[str, Why] = {}
    new_state: dict[str, GuestState] = {}
    hungry: list[Guest] = []
    for g in guests:
        prev = states.get(g.name, GuestState())
        actual, used = g.stats.actual_mib, g.stats.used_mib
        is_hungry = _hungry(g, prev, k)
        new_state[g.name] = GuestState(
            used_mib=used,
            major_faults=g.stats.major_faults,
            hungry=is_hungry,
            last_grow_s=prev.last_grow_s,
        )
        if used is None:
            want[g.name] = floor[g.name] = _clamp(actual, g)
            why[g.name] = Why.UNREPORTED
        elif is_hungry:
            hungry.append(g)
            want[g.name] = _clamp(max(actual, used + 2 * k.headroom_mib), g)
            floor[g.name] = _clamp(actual, g)
            why[g.name] = Why.GROW
        else:
            comfort = _clamp(used + k.headroom_mib, g)
            cooling = prev.last_grow_s is not None and now - prev.last_grow_s < k.shrink_cooldown_s
            keep = _clamp(actual, g)
            want[g.name] = comfort if pressure and comfort < keep and not cooling else keep
            floor[g.name] = min(comfort, keep) if not cooling else keep
            why[g.name] = Why.SHRINK if want[g.name] < actual else Why.KEEP
    _fit(guests, want, floor, why, room, hungry)
    targets: dict[str, Target] = {}
    for g in guests:
        actual = g.stats.actual_mib
        target = want[g.name]
        if target < actual:
            target = max(target, actual - k.shrink_step_mib)
        elif target > actual:
            target = min(target, actual + k.grow_step_mib)
        target = _clamp(target, g)
        in_bounds = g.min_mib <= actual <= g.max_mib
        if in_bounds and abs(target - actual) < k.hysteresis_mib:
            target = actual
        reason = why[g.name] if target != actual else Why.KEEP
        if not in_bounds:
            reason = Why.BOUNDS
        targets[g.name] = Target(target, actual, reason, new_state[g.name])
    _limit_growth(guests, targets, room)
    for name, t in targets.items():
        if t.target_mib > t.actual_mib:
            targets[name] = dataclasses.replace(
                t, state=dataclasses.replace(t.state, last_grow_s=now)
            )
        elif t.target_mib == t.actual_mib and t.why is not Why.BOUNDS:
            targets[name] = dataclasses.replace(t, why=Why.KEEP)
    return Outcome(targets, pressure, room)


def _fit(  # noqa: PLR0917 - the policy's working tables, passed on once
    guests: Sequence[Guest],
    want: dict[str, int],
    floor: dict[str, int],
    why: dict[str, Why],
    room: int,
    hungry: Sequence[Guest],
) -> None:
    """Lower ``want`` until it sums to ``room``: idle spare, then idle to min, then growth."""
    over = sum(want.values()) - room
    if over <= 0:
        return
    hungry_names = {g.name for g in hungry}
    idle = [g for g in guests if g.name not in hungry_names and why[g.name] != Why.UNREPORTED]
    for lowest in (lambda g: floor[g.name], lambda g: g.min_mib):
        for g in sorted(idle, key=lambda g: lowest(g) - want[g.name]):
            if over <= 0:
                return
            give = min(over, max(0, want[g.name] - lowest(g)))
            if give:
                want[g.name] -= give
                over -= give
                why[g.name] = Why.GIVE_WAY
    # Still over: hungry guests grow less, the least squeezed first.
    for g in sorted(hungry, key=lambda g: -(g.stats.usable_mib or 0)):
        if over <= 0:
            return
        give = min(over, max(0, want[g.name] - floor[g.name]))
        want[g.name] -= give
        over -= give


def _limit_growth(guests: Sequence[Guest], targets: dict[str, Target], room: int) -> None:
    """Growth only into memory free *now*: shrinks bounded by their step may free less."""
    settled = sum(min(t.target_mib, t.actual_mib) for t in targets.values())
    spare = max(0, room - settled)
    growers = [g for g in guests if targets[g.name].target_mib > targets[g.name].actual_mib]
    for g in sorted(growers, key=lambda g: g.stats.usable_mib or 0):
        t = targets[g.name]
        owed = max(0, g.min_mib - t.actual_mib)  # back to min is never refused
        grant = max(owed, min(t.target_mib - t.actual_mib, spare))
        spare = max(0, spare - grant)
        if grant < t.target_mib - t.actual_mib:
            targets[g.name] = dataclasses.replace(t, target_mib=t.actual_mib + grant)
