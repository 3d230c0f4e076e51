"""Hypervisor parameters, each declared once with its two checks.

Why this module exists: Ganeti declares a parameter in three places (a constant, a type
table and the driver's PARAMETERS five-tuple). kubehv declares it once, as a
:class:`Parameter` carrying Ganeti's five parts -- required flag, syntax check + message
(cluster side, no I/O: runs in the webhook), node check + message (node side: runs in the
agent before start) -- plus its type, default and a description for docs.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping

from kubehv.drivers import errors, values

Check = Callable[[values.ParamValue], bool]


def _always(_: values.ParamValue) -> bool:
    return True


@dataclasses.dataclass(frozen=True, slots=True)
class Parameter:
    """One hypervisor parameter (Ganeti's PARAMETERS five-tuple, typed and named)."""

    name: str
    type: type
    description: str
    required: bool = False
    default: values.ParamValue | None = None
    syntax_check: Check = _always
    syntax_message: str = "invalid value"
    node_check: Check = _always
    node_message: str = "not usable on this node"
    choices: tuple[str, ...] = ()


def _coerce(param: Parameter, value: values.ParamValue) -> values.ParamValue:
    """Check the value's type strictly: manifests carry strings, ints and bools as they are."""
    if param.type is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if param.type is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError
        return value
    if param.type is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError
        return float(value)
    if not isinstance(value, str):
        raise TypeError
    return value


def check_syntax(
    declared: Mapping[str, Parameter], params: Mapping[str, values.ParamValue]
) -> dict[str, values.ParamValue]:
    """Cluster-side check (no I/O). Returns the params with defaults filled in.

    Collects every problem before raising, so a person fixes a manifest in one go.
    """
    problems: list[str] = []
    out: dict[str, values.ParamValue] = {}
    for key in sorted(params):
        if key not in declared:
            known = ", ".join(sorted(declared)) or "none"
            problems.append(f"unknown parameter {key!r} (known parameters: {known})")
    for name, param in declared.items():
        if name not in params:
            if param.required:
                problems.append(f"parameter {name!r} is required: {param.description}")
            elif param.default is not None:
                out[name] = param.default
            continue
        raw = params[name]
        try:
            value = _coerce(param, raw)
        except TypeError:
            problems.append(
                f"parameter {name!r} must be of type {param.type.__name__}, "
                f"got {type(raw).__name__} {raw!r}"
            )
            continue
        if param.choices and value not in param.choices:
            problems.append(
                f"parameter {name!r} must be one of {', '.join(param.choices)}, got {value!r}"
            )
            continue
        if not param.syntax_check(value):
            problems.append(f"parameter {name!r}: {param.syntax_message} (got {value!r})")
            continue
        out[name] = value
    if problems:
        raise errors.ParameterError(problems)
    return out


def check_on_node(
    declared: Mapping[str, Parameter], params: Mapping[str, values.ParamValue]
) -> None:
    """Node-side check: runs each parameter's node check (may do I/O)."""
    problems: list[str] = []
    for name, value in params.items():
        param = declared.get(name)
        if param is None:
            continue
        if not param.node_check(value):
            problems.append(f"parameter {name!r}: {param.node_message} (got {value!r})")
    if problems:
        raise errors.NodeParameterError(problems)


# --- reusable checks ---------------------------------------------------------------------

_SAFE_PATH = re.compile(r"^/[A-Za-z0-9._+@/-]*$")


def is_absolute_path(value: values.ParamValue) -> bool:
    """An absolute, normalised path without '..' or shell/XML metacharacters."""
    return (
        isinstance(value, str)
        and bool(_SAFE_PATH.match(value))
        and os.path.normpath(value) == value
        and ".." not in value.split("/")
    )


def is_existing_file(value: values.ParamValue) -> bool:
    return isinstance(value, str) and os.path.isfile(value)


def is_positive(value: values.ParamValue) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def is_non_negative(value: values.ParamValue) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0


def matches(pattern: str) -> Check:
    compiled = re.compile(pattern)

    def check(value: values.ParamValue) -> bool:
        return isinstance(value, str) and bool(compiled.fullmatch(value))

    return check


def path_under(allowed_dirs: Callable[[], tuple[str, ...]]) -> Check:
    """Node check: the path exists and lies inside one of the allowed directories.

    ``allowed_dirs`` is called at check time so an agent's configuration can change it.
    """

    def check(value: values.ParamValue) -> bool:
        if not isinstance(value, str) or not os.path.isabs(value):
            return False
        real = os.path.realpath(value)
        dirs = allowed_dirs()
        if dirs and not any(
            real == os.path.realpath(d) or real.startswith(os.path.realpath(d) + os.sep)
            for d in dirs
        ):
            return False
        return os.path.exists(real)

    return check
