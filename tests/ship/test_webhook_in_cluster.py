"""The in-cluster webhook for real: certificate kept in a Secret, caBundle set, admission served.

Why: in a cluster the controller runs with ``KUBEHV_WEBHOOK_*`` from its Deployment
(manifests/base/controller.yaml) and the API server calls it through a Service. No kubelet or
kube-proxy runs here, so the test's ValidatingWebhookConfiguration points at the controller
by URL (127.0.0.1, added to the certificate's names with ``KUBEHV_WEBHOOK_EXTRA_SANS``);
everything else is the production path: the controller process fills the Secret, writes the
caBundle, the real kube-apiserver verifies the served certificate against it and calls the
handler at the manifests' path, renewal rewrites the Secret and the server reloads it. With
``KUBEHV_WEBHOOK_CERTS=secret`` (the cert-manager component) it only reads.
"""

from __future__ import annotations

import base64
import datetime
import ssl
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from cryptography import x509

from kubehv.devenv import controlplane as cpmod
from kubehv.operator import webhook_certs as wc
from tests.fixtures.operator import GROUP, VERSION, VI, Proc, fake_vi_body, wait_for

pytestmark = pytest.mark.apiserver

SECRET, SERVICE = "kubehv-webhook-tls", "kubehv-webhook"


class InClusterWebhook:
    """A Secret, a webhook configuration and a controller configured as the Deployment is."""

    def __init__(self, cp: Any, namespace: str, mode: str, workdir: Path) -> None:
        self.cp, self.namespace, self.mode = cp, namespace, mode
        self.api: Any = cp.api_client()
        self.core: Any = kubernetes.client.CoreV1Api(self.api)
        self.adm: Any = kubernetes.client.AdmissionregistrationV1Api(self.api)
        self.custom: Any = kubernetes.client.CustomObjectsApi(self.api)
        self.port = cpmod.free_port()
        self.configuration = f"kubehv-test-{uuid.uuid4().hex[:6]}"
        svc = f"{SERVICE}.{namespace}"
        self.names = (SERVICE, svc, f"{svc}.svc", f"{svc}.svc.cluster.local", "127.0.0.1")
        env = cp.env()
        env.update(
            PYTHONUNBUFFERED="1",
            POD_NAMESPACE=namespace,
            KUBEHV_WEBHOOK_SECRET=SECRET,
            KUBEHV_WEBHOOK_SERVICE=SERVICE,
            KUBEHV_WEBHOOK_CONFIGURATION=self.configuration,
            KUBEHV_WEBHOOK_CERTS=mode,
            KUBEHV_WEBHOOK_EXTRA_SANS="127.0.0.1",
            KUBEHV_WEBHOOK_CHECK_INTERVAL="1",
        )
        argv = [
            sys.executable, "-m", "kubehv.cli", "controller", "--kubeconfig", str(cp.kubeconfig),
            "--webhook-port", str(self.port), "--no-leader-election", "--check-interval", "1",
        ]  # fmt: skip
        self.controller = Proc("controller", argv, workdir / "controller.log", env)

    def create_secret(self, data: dict[str, bytes] | None = None) -> None:
        body = kubernetes.client.V1Secret(
            metadata=kubernetes.client.V1ObjectMeta(name=SECRET),
            type="kubernetes.io/tls",
            data=wc.encode(data) if data else {"tls.crt": "", "tls.key": ""},
        )
        self.core.create_namespaced_secret(self.namespace, body)

    def create_configuration(self, ca_bundle: bytes | None = None) -> None:
        config: dict[str, Any] = {"url": f"https://127.0.0.1:{self.port}/virtualinstance"}
        if ca_bundle:
            config["caBundle"] = base64.b64encode(ca_bundle).decode()
        body = {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingWebhookConfiguration",
            "metadata": {"name": self.configuration},
            "webhooks": [
                {
                    "name": "validate.kubehv.io",
                    "admissionReviewVersions": ["v1"],
                    "sideEffects": "None",
                    "failurePolicy": "Fail",
                    "timeoutSeconds": 5,
                    "clientConfig": config,
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": self.namespace}
                    },
                    "rules": [
                        {
                            "apiGroups": [GROUP],
                            "apiVersions": ["*"],
                            "operations": ["CREATE", "UPDATE"],
                            "resources": [VI],
                            "scope": "Namespaced",
                        }
                    ],
                }
            ],
        }
        self.adm.create_validating_webhook_configuration(body)

    def secret(self) -> Any:
        return self.core.read_namespaced_secret(SECRET, self.namespace)

    def secret_data(self) -> dict[str, bytes]:
        return wc.decode(self.secret().data)

    def ca_bundle(self) -> str | None:
        conf = self.adm.read_validating_webhook_configuration(self.configuration)
        bundle: str | None = conf.webhooks[0].client_config.ca_bundle
        return bundle

    def served_serial(self) -> int | None:
        try:
            pem = ssl.get_server_certificate(("127.0.0.1", self.port), timeout=2)
        except OSError:
            return None
        return x509.load_pem_x509_certificate(pem.encode()).serial_number

    def refuses_bad_instance(self) -> str:
        """The API server's refusal of an instance with an unknown parameter ("" if accepted)."""
        name = f"bad-{uuid.uuid4().hex[:6]}"
        body = fake_vi_body(name, hypervisorParameters={"no_such_param": "1"})
        try:
            self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, VI, body)
        except kubernetes.client.ApiException as exc:
            return str(exc.body)
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, VI, name)
        return ""

    def close(self) -> None:
        self.controller.stop()
        try:
            self.adm.delete_validating_webhook_configuration(self.configuration)
        finally:
            self.api.close()


@pytest.fixture
def in_cluster(
    control_plane: Any, crds_installed: Any, namespace: str, tmp_path: Path
) -> Iterator[Any]:
    made: list[InClusterWebhook] = []

    def make(mode: str) -> InClusterWebhook:
        hook = InClusterWebhook(control_plane, namespace, mode, tmp_path)
        made.append(hook)
        return hook

    try:
        yield make
    finally:
        for hook in made:
            print(hook.controller.tail(80))
            hook.close()


def _serial(pem: bytes) -> int:
    return x509.load_pem_x509_certificate(pem).serial_number


def test_controller_makes_renews_and_serves_its_certificate(in_cluster: Any) -> None:
    hook = in_cluster("self")
    hook.create_secret()
    hook.create_configuration()  # no caBundle: the controller must set it
    hook.controller.start()

    data = wait_for(lambda: hook.secret_data().get(wc.TLS_CRT) and hook.secret_data(), 60,
                    "the controller to fill the Secret")  # fmt: skip
    now = datetime.datetime.now(datetime.UTC)
    assert wc.serving_problem(data[wc.TLS_CRT], data[wc.CA_CRT], hook.names, now) is None
    wait_for(lambda: hook.ca_bundle() == base64.b64encode(data[wc.CA_CRT]).decode(), 30,
             "the caBundle to be the Secret's CA")  # fmt: skip
    wait_for(lambda: hook.served_serial() == _serial(data[wc.TLS_CRT]), 60, "the server")
    refusal = wait_for(hook.refuses_bad_instance, 30, "the webhook to refuse a bad instance")
    assert "unknown parameter 'no_such_param'" in refusal, refusal
    good = fake_vi_body("good")
    hook.custom.create_namespaced_custom_object(GROUP, VERSION, hook.namespace, VI, good)

    # Renewal: a serving certificate with a day left (signed by the same CA) is replaced, the
    # CA and caBundle stay, and the server picks the new one up without a restart.
    ca, ca_key = data[wc.CA_CRT], data[wc.CA_KEY]
    old = now - datetime.timedelta(days=89)
    stale_cert, stale_key = wc.make_serving(ca, ca_key, hook.names, old)
    secret = hook.secret()
    secret.data = wc.encode({**data, wc.TLS_CRT: stale_cert, wc.TLS_KEY: stale_key})
    hook.core.replace_namespaced_secret(SECRET, hook.namespace, secret)

    def renewed() -> dict[str, bytes] | None:
        got = hook.secret_data()
        crt = got.get(wc.TLS_CRT)
        return got if crt and _serial(crt) != _serial(stale_cert) else None

    new = wait_for(renewed, 60, "the controller to renew the stale certificate")
    assert _serial(new[wc.TLS_CRT]) != _serial(data[wc.TLS_CRT])
    assert new[wc.CA_CRT] == ca
    assert wc.serving_problem(new[wc.TLS_CRT], ca, hook.names, now) is None
    wait_for(lambda: hook.served_serial() == _serial(new[wc.TLS_CRT]), 60,
             "the server to reload the renewed certificate")  # fmt: skip
    assert hook.controller.alive(), "renewal must not need a restart"
    assert "unknown parameter" in wait_for(hook.refuses_bad_instance, 30, "refusal again")


def test_with_cert_manager_the_controller_only_reads(in_cluster: Any) -> None:
    hook = in_cluster("secret")
    now = datetime.datetime.now(datetime.UTC)
    ca, ca_key = wc.make_ca(now)
    cert, key = wc.make_serving(ca, ca_key, hook.names, now)
    # What cert-manager would write: the pair and ca.crt, and the injected caBundle.
    hook.create_secret({wc.TLS_CRT: cert, wc.TLS_KEY: key, wc.CA_CRT: ca})
    hook.create_configuration(ca_bundle=ca)
    version = hook.secret().metadata.resource_version
    bundle = hook.ca_bundle()
    hook.controller.start()

    wait_for(
        lambda: hook.served_serial() == _serial(cert), 60, "the server with cert-manager's pair"
    )
    refusal = wait_for(hook.refuses_bad_instance, 30, "the webhook to refuse a bad instance")
    assert "unknown parameter 'no_such_param'" in refusal, refusal
    assert hook.secret().metadata.resource_version == version, "the Secret was written"
    assert hook.ca_bundle() == bundle, "the caBundle was written"
