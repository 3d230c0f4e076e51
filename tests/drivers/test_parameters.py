"""Ganeti's five-part parameter semantics, as kubehv.drivers.parameters implements them.

Why: the webhook (syntax, no I/O) and the agent (node checks) both rely on these rules; each
of the five parts -- required, syntax check + message, node check + message -- must do what
Ganeti's PARAMETERS five-tuple does, and every problem must be reported at once.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import pytest

from kubehv.drivers import errors, fake, parameters, values

P = parameters.Parameter

DECLARED: Mapping[str, parameters.Parameter] = {
    "kernel": P(
        "kernel",
        str,
        "the kernel image",
        required=True,
        syntax_check=parameters.is_absolute_path,
        syntax_message="must be an absolute path",
        node_check=parameters.is_existing_file,
        node_message="no such file on this node",
    ),
    "vcpu_pin": P("vcpu_pin", int, "a CPU to pin to", default=0),
    "acpi": P("acpi", bool, "ACPI on", default=True),
    "ratio": P("ratio", float, "a ratio", syntax_check=parameters.is_positive),
    "accel": P("accel", str, "accelerator", default="auto", choices=("kvm", "tcg", "auto")),
}


def test_required_parameter_missing() -> None:
    with pytest.raises(errors.ParameterError) as exc:
        parameters.check_syntax(DECLARED, {})
    assert exc.value.problems == ("parameter 'kernel' is required: the kernel image",)


def test_defaults_are_filled_and_values_kept() -> None:
    out = parameters.check_syntax(DECLARED, {"kernel": "/boot/vmlinuz", "ratio": 2})
    assert out == {
        "kernel": "/boot/vmlinuz",
        "vcpu_pin": 0,
        "acpi": True,
        "ratio": 2.0,  # ints are accepted for floats, and become floats
        "accel": "auto",
    }
    assert isinstance(out["ratio"], float)


def test_syntax_check_uses_its_message() -> None:
    with pytest.raises(errors.ParameterError) as exc:
        parameters.check_syntax(DECLARED, {"kernel": "boot/vmlinuz"})
    assert exc.value.problems == (
        "parameter 'kernel': must be an absolute path (got 'boot/vmlinuz')",
    )


def test_types_are_strict() -> None:
    with pytest.raises(errors.ParameterError) as exc:
        parameters.check_syntax(
            DECLARED,
            {"kernel": 5, "vcpu_pin": True, "acpi": "yes", "ratio": "1.5"},
        )
    problems = exc.value.problems
    assert len(problems) == 4
    for name, kind in (
        ("kernel", "str"),
        ("vcpu_pin", "int"),
        ("acpi", "bool"),
        ("ratio", "float"),
    ):
        assert any(p.startswith(f"parameter {name!r} must be of type {kind}") for p in problems)


def test_choices() -> None:
    with pytest.raises(errors.ParameterError, match="must be one of kvm, tcg, auto"):
        parameters.check_syntax(DECLARED, {"kernel": "/k", "accel": "xen"})


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(errors.ParameterError) as exc:
        parameters.check_syntax(DECLARED, {"unknown_a": 1, "unknown_b": 2, "ratio": -1.0})
    problems = exc.value.problems
    assert len(problems) == 4  # two unknown, kernel required, ratio fails its syntax check
    assert (
        "unknown_a" in problems[0]
        and "known parameters: accel, acpi, kernel, ratio, vcpu_pin" in problems[0]
    )
    assert "unknown_b" in problems[1]
    assert exc.value.reason == "InvalidParameters"
    assert str(exc.value) == "; ".join(problems)


def test_node_check_is_separate_and_uses_its_message(tmp_path: Path) -> None:
    missing = str(tmp_path / "vmlinuz")
    checked = parameters.check_syntax(DECLARED, {"kernel": missing})  # syntax: fine, no I/O
    with pytest.raises(errors.NodeParameterError) as exc:
        parameters.check_on_node(DECLARED, checked)
    assert exc.value.problems == (
        f"parameter 'kernel': no such file on this node (got {missing!r})",
    )
    assert exc.value.reason == "ParametersInvalidOnNode"
    assert isinstance(exc.value, errors.ParameterError)
    Path(missing).write_text("kernel")
    parameters.check_on_node(DECLARED, checked)


def test_node_check_ignores_undeclared_names() -> None:
    parameters.check_on_node(DECLARED, {"something_else": 1})


class WithParams(fake.FakeHypervisor):
    """A driver whose PARAMETERS carry a node check, to see validate_parameters' order."""

    PARAMETERS: ClassVar = DECLARED


def test_validate_parameters_runs_syntax_then_node(tmp_path: Path) -> None:
    with pytest.raises(errors.ParameterError) as exc:
        WithParams.validate_parameters({"kernel": "relative"})
    assert not isinstance(exc.value, errors.NodeParameterError)
    with pytest.raises(errors.NodeParameterError):
        WithParams.validate_parameters({"kernel": str(tmp_path / "absent")})
    (tmp_path / "k").write_text("kernel")
    WithParams.validate_parameters({"kernel": str(tmp_path / "k")})


def test_fake_driver_parameters_are_declared_five_part() -> None:
    out = fake.FakeHypervisor.check_parameter_syntax({"fail_migration_at": "accept"})
    assert out["fail_migration_at"] == "accept" and out["fail_start"] is False
    with pytest.raises(errors.ParameterError) as exc:
        fake.FakeHypervisor.check_parameter_syntax(
            {"fail_migration_at": "never", "migration_duration_s": -1, "crash_after_s": 0}
        )
    assert len(exc.value.problems) == 3


# --- the reusable checks --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("/boot/vmlinuz", True),
        ("/var/lib/kubehv/guest-1.img", True),
        ("boot/vmlinuz", False),
        ("/boot/../etc/shadow", False),
        ("/boot//vmlinuz", False),
        ("/boot/vmlinuz/", False),
        ("/boot/<x>", False),
        ("/boot/a&b", False),
        ("/boot/it's", False),
        ("/boot/a b", False),
        (5, False),
    ],
)
def test_is_absolute_path(value: values.ParamValue, ok: bool) -> None:
    assert parameters.is_absolute_path(value) is ok


def test_number_checks_reject_bools() -> None:
    assert parameters.is_positive(1) and parameters.is_positive(0.5)
    assert not parameters.is_positive(0) and not parameters.is_positive(True)
    assert parameters.is_non_negative(0) and not parameters.is_non_negative(-0.1)
    assert not parameters.is_non_negative(False)


def test_matches_is_a_full_match() -> None:
    check = parameters.matches(r"[a-z]+")
    assert check("abc") and not check("abc1") and not check(3)


def test_path_under(tmp_path: Path) -> None:
    allowed = tmp_path / "images"
    allowed.mkdir()
    (allowed / "disk.img").write_text("x")
    (tmp_path / "secret").write_text("x")
    os.symlink(tmp_path / "secret", allowed / "escape")
    check = parameters.path_under(lambda: (str(allowed),))
    assert check(str(allowed / "disk.img"))
    assert not check(str(allowed / "absent.img"))
    assert not check(str(tmp_path / "secret"))
    assert not check(str(allowed / "escape"))  # a symlink out of the allowed dir
    assert not check("relative.img")
    anywhere = parameters.path_under(tuple)
    assert anywhere(str(tmp_path / "secret"))
