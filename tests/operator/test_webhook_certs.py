"""The webhook certificate rules, without a cluster: what is made, what is judged stale."""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509

from kubehv.operator import webhook_certs as wc

NOW = datetime.datetime(2026, 6, 1, tzinfo=datetime.UTC)
NAMES = ("kubehv-webhook", "kubehv-webhook.kubehv-system.svc", "127.0.0.1")


def serial(pem: bytes) -> int:
    return x509.load_pem_x509_certificate(pem).serial_number


def test_empty_secret_gets_a_ca_and_a_serving_certificate_for_every_name() -> None:
    change = wc.renewed({}, NAMES, NOW)
    assert change is not None
    data, why = change
    assert why == "no CA yet"
    assert wc.serving_problem(data[wc.TLS_CRT], data[wc.CA_CRT], NAMES, NOW) is None
    assert wc.ca_problem(data[wc.CA_CRT], data[wc.CA_KEY], NOW) is None
    # Nothing to do on the next pass.
    assert wc.renewed(data, NAMES, NOW) is None


def test_serving_certificate_renewed_with_a_third_left_and_the_ca_kept() -> None:
    data, _ = wc.renewed({}, NAMES, NOW) or ({}, "")
    later = NOW + datetime.timedelta(days=wc.SERVING_DAYS * 2 // 3 + 1)
    change = wc.renewed(data, NAMES, later)
    assert change is not None
    new, why = change
    assert "less than a third of its lifetime left" in why
    assert new[wc.CA_CRT] == data[wc.CA_CRT], "the caBundle must not change on renewal"
    assert serial(new[wc.TLS_CRT]) != serial(data[wc.TLS_CRT])
    assert wc.serving_problem(new[wc.TLS_CRT], new[wc.CA_CRT], NAMES, later) is None
    # Not yet at two thirds: kept.
    early = NOW + datetime.timedelta(days=wc.SERVING_DAYS // 2)
    assert wc.renewed(data, NAMES, early) is None


def test_wrong_names_garbage_and_foreign_signatures_are_replaced() -> None:
    data, _ = wc.renewed({}, NAMES, NOW) or ({}, "")
    more = (*NAMES, "kubehv-webhook.other.svc")
    assert "does not name kubehv-webhook.other.svc" in (
        wc.serving_problem(data[wc.TLS_CRT], data[wc.CA_CRT], more, NOW) or ""
    )
    assert "cannot be read" in (wc.serving_problem(b"junk", data[wc.CA_CRT], NAMES, NOW) or "")
    other_ca, other_key = wc.make_ca(NOW)
    foreign, _ = wc.make_serving(other_ca, other_key, NAMES, NOW)
    assert "not signed by the CA" in (
        wc.serving_problem(foreign, data[wc.CA_CRT], NAMES, NOW) or ""
    )
    change = wc.renewed({**data, wc.TLS_CRT: foreign}, NAMES, NOW)
    assert change is not None and change[0][wc.CA_CRT] == data[wc.CA_CRT]


def test_settings_from_the_deployment_environment() -> None:
    assert wc.CertSettings.from_env({}, Path("/x")) is None
    env = {
        "KUBEHV_WEBHOOK_SECRET": "tls",
        "POD_NAMESPACE": "ns",
        "KUBEHV_WEBHOOK_SERVICE": "svc",
        "KUBEHV_WEBHOOK_CERTS": "secret",
        "KUBEHV_WEBHOOK_EXTRA_SANS": "10.0.0.1,hook.example",
    }
    s = wc.CertSettings.from_env(env, Path("/x"))
    assert s is not None and s.mode == "secret"
    assert s.names == (
        "svc", "svc.ns", "svc.ns.svc", "svc.ns.svc.cluster.local", "10.0.0.1", "hook.example"
    )  # fmt: skip
    try:
        wc.CertSettings.from_env({**env, "KUBEHV_WEBHOOK_CERTS": "maybe"}, Path("/x"))
    except ValueError as exc:
        assert "'self' or 'secret'" in str(exc)
    else:
        raise AssertionError("a bad KUBEHV_WEBHOOK_CERTS was accepted")
