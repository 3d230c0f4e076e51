"""The agent's and controller's own API client (operator/rest.py, kubeconfig.py) against a
real kube-apiserver: kubeconfig with a client certificate (inline data and file paths),
a service-account token in the in-cluster layout (including rotation of a bound token),
the error mapping callers rely on (404 NotFound, 409 Conflict, 403 ApiError), and that the
long-running processes' import graph never loads the ``kubernetes`` package.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubehv import api
from kubehv.api import constants
from kubehv.operator import events, k8s, kubeconfig, rest

pytestmark = pytest.mark.apiserver


def _cm_path(namespace: str, name: str = "") -> str:
    return rest.path("", "v1", "configmaps", name, namespace)


def test_kubeconfig_with_inline_certificate_reads_writes_and_maps_errors(
    control_plane: Any, namespace: str
) -> None:
    client = k8s.load_api_client(str(control_plane.kubeconfig))
    assert client.creds.cert_file and client.creds.key_file and client.creds.ca_file
    name = f"cm-{uuid.uuid4().hex[:6]}"
    body = {"metadata": {"name": name}, "data": {"a": "1"}}
    made = client.create(_cm_path(namespace), body)
    assert made["metadata"]["name"] == name
    with pytest.raises(k8s.Conflict) as exists:  # create twice: AlreadyExists is a 409
        client.create(_cm_path(namespace), body)
    assert exists.value.status == 409 and exists.value.reason == "AlreadyExists"
    assert k8s.is_status(exists.value, 409)
    # A write carrying an old resourceVersion loses with 409 too (the hand-off rule).
    stale = dict(made, data={"a": "2"})
    client.replace(_cm_path(namespace, name), stale)
    with pytest.raises(k8s.Conflict):
        client.replace(_cm_path(namespace, name), dict(made, data={"a": "3"}))
    patched = client.merge_patch(_cm_path(namespace, name), {"data": {"b": "x"}})
    assert patched["data"] == {"a": "2", "b": "x"}
    listed = client.list(_cm_path(namespace), fieldSelector=f"metadata.name={name}")
    assert [i["metadata"]["name"] for i in listed] == [name]
    client.delete(_cm_path(namespace, name))
    with pytest.raises(k8s.NotFound) as gone:
        client.get(_cm_path(namespace, name))
    assert gone.value.status == 404 and k8s.is_status(gone.value, 404)
    assert not k8s.is_status(gone.value, 409)


def test_kubeconfig_with_certificate_files_and_relative_paths(
    control_plane: Any, tmp_path: Path
) -> None:
    """client-certificate / client-key / certificate-authority as paths, relative to the
    kubeconfig's folder (kubectl's rule)."""
    config = yaml.safe_load(Path(control_plane.kubeconfig).read_text())
    cluster, user = config["clusters"][0]["cluster"], config["users"][0]["user"]
    for field, fname in (("certificate-authority-data", "ca.crt"),):
        (tmp_path / fname).write_bytes(base64.b64decode(cluster.pop(field)))
        cluster["certificate-authority"] = fname
    (tmp_path / "admin.crt").write_bytes(base64.b64decode(user.pop("client-certificate-data")))
    (tmp_path / "admin.key").write_bytes(base64.b64decode(user.pop("client-key-data")))
    user["client-certificate"], user["client-key"] = "admin.crt", "admin.key"
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    creds = kubeconfig.load(str(path))
    assert creds.ca_file == str(tmp_path / "ca.crt")
    client = rest.Client(creds)
    assert client.get("/api/v1/namespaces/default")["metadata"]["name"] == "default"


def _service_account(control_plane: Any, namespace: str, tmp_path: Path, name: str) -> Path:
    """A ServiceAccount with a bound token, laid out as a pod sees it."""
    control_plane.kubectl("-n", namespace, "create", "serviceaccount", name)
    token = control_plane.kubectl("-n", namespace, "create", "token", name).stdout.strip()
    sa_dir = tmp_path / name
    sa_dir.mkdir()
    (sa_dir / "token").write_text(token)
    (sa_dir / "namespace").write_text(namespace)
    (sa_dir / "ca.crt").write_bytes(Path(control_plane.certs.ca_cert).read_bytes())
    return sa_dir


def _in_cluster_env(control_plane: Any) -> dict[str, str]:
    host_port = control_plane.url.split("://", 1)[1]
    host, port = host_port.rsplit(":", 1)
    return {"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port}


def test_service_account_token_403_then_allowed_and_rotated(
    control_plane: Any, namespace: str, tmp_path: Path
) -> None:
    sa = f"sa-{uuid.uuid4().hex[:5]}"
    sa_dir = _service_account(control_plane, namespace, tmp_path, sa)
    creds = kubeconfig.in_cluster(sa_dir, _in_cluster_env(control_plane))
    assert creds.namespace == namespace and creds.token and creds.token_file
    client = rest.Client(creds)
    secret = f"s-{uuid.uuid4().hex[:5]}"
    control_plane.kubectl(
        "-n", namespace, "create", "secret", "generic", secret, "--from-literal=k=v1"
    )
    kube = k8s.Kube(client)
    with pytest.raises(k8s.ApiError) as denied:  # no RBAC yet: Forbidden, not NotFound
        kube.read_secret_key(namespace, secret, "k")
    assert denied.value.status == 403 and k8s.is_status(denied.value, 403)
    assert not isinstance(denied.value, (k8s.NotFound, k8s.Conflict))
    control_plane.kubectl(
        "-n", namespace, "create", "role", "read-secrets", "--verb=get", "--resource=secrets"
    )
    control_plane.kubectl(
        "-n", namespace, "create", "rolebinding", "read-secrets", "--role=read-secrets",
        f"--serviceaccount={namespace}:{sa}",
    )  # fmt: skip
    assert _eventually(lambda: kube.read_secret_key(namespace, secret, "k")) == b"v1"
    assert kube.read_secret_key(namespace, secret, "missing") is None
    assert kube.read_secret_key(namespace, "no-such-secret", "k") is None
    # The kubelet rotates a bound token by rewriting the file; a bad token answers 401,
    # after which the client re-reads the file once and goes on with the new token.
    (sa_dir / "token").write_text("not-a-token")
    creds.refresh()
    with pytest.raises(k8s.ApiError) as unauthorized:
        kube.read_secret_key(namespace, secret, "k")
    assert unauthorized.value.status == 401
    fresh = control_plane.kubectl("-n", namespace, "create", "token", sa).stdout.strip()
    (sa_dir / "token").write_text(fresh)  # rotated; the client still holds the bad one
    assert creds.token == "not-a-token"
    assert kube.read_secret_key(namespace, secret, "k") == b"v1"
    assert creds.token == fresh


def _eventually(fn: Any, tries: int = 50) -> Any:
    """RBAC bindings take effect within moments (the authorizer's informer)."""
    for _ in range(tries - 1):
        try:
            return fn()
        except k8s.ApiError as exc:
            if exc.status != 403:
                raise
            time.sleep(0.2)
    return fn()


def test_not_in_a_cluster_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(kubeconfig.ConfigError, match="not in a cluster"):
        kubeconfig.in_cluster(tmp_path, {})


def test_kube_custom_objects_and_events(
    control_plane: Any, crds_installed: Any, namespace: str
) -> None:
    """Kube's custom-object calls (what the owner and controller use) and an Event."""
    kube = k8s.Kube(k8s.load_api_client(str(control_plane.kubeconfig)))
    name = f"vi-{uuid.uuid4().hex[:5]}"
    control_plane.kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": f"{constants.GROUP}/{constants.VERSION}", "kind": "VirtualInstance",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"hypervisor": "fake", "memory": {"min": "64Mi", "max": "64Mi"}, "vcpus": 1},
    }))  # fmt: skip
    body = kube.get_instance(namespace, name)
    assert body is not None and body["metadata"]["name"] == name
    assert kube.get_instance(namespace, "nope") is None
    vi = api.VirtualInstance.model_validate(body)
    kube.patch_instance_status(vi, {"message": "one"})
    with pytest.raises(k8s.Conflict):  # the read's resourceVersion is stale now
        kube.patch_instance_status(vi, {"message": "two"})
    got = kube.list_instances(f"metadata.name={name}")
    assert [i["status"].get("message") for i in got] == ["one"]
    with pytest.raises(k8s.NotFound):
        kube.get_migration(namespace, "nope")
    assert kube.list_migrations("spec.instance=nope", namespace) == []
    events.post(kube, vi, "Tested", "an event from the thin client")
    listed = control_plane.kubectl(
        "-n", namespace, "get", "events", "-o", "json",
        f"--field-selector=involvedObject.name={name},reason=Tested",
    ).stdout  # fmt: skip
    items = json.loads(listed)["items"]
    assert len(items) == 1 and items[0]["involvedObject"]["uid"] == vi.metadata.uid


def test_agent_and_controller_never_import_the_kubernetes_package() -> None:
    """The entry point (``python -m kubehv.cli agent|controller``) loads the whole operator
    and kopf with the package refused; any import of it would fail the process."""
    code = (
        "import sys\n"
        "from kubehv import cli\n"
        "try:\n    cli.main([sys.argv[1], '--help'])\n"
        "except SystemExit:\n    pass\n"
        "import kubehv.operator.agent, kubehv.operator.controller\n"
        "loaded = [m for m, v in sys.modules.items() if m.split('.')[0] == 'kubernetes' and v]\n"
        "assert 'kopf' in sys.modules and 'kubehv.operator.owner' in sys.modules\n"
        "print(loaded)\n"
    )
    for command in ("agent", "controller"):
        out = subprocess.run(
            [sys.executable, "-c", code, command], capture_output=True, text=True, check=False
        )
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_webhook_ca_bundle_and_token_review(
    control_plane: Any, namespace: str, tmp_path: Path
) -> None:
    """The two calls the Secret hand-over needs, on the thin client."""
    kube = k8s.Kube(k8s.load_api_client(str(control_plane.kubeconfig)))
    name = f"kubehv-test-{uuid.uuid4().hex[:6]}"
    assert kube.read_webhook_ca_bundle(name) is None
    pem = b"-----BEGIN CERTIFICATE-----\nnot checked here\n-----END CERTIFICATE-----\n"
    config = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [{
            "name": "vi.kubehv.io", "sideEffects": "None", "admissionReviewVersions": ["v1"],
            "clientConfig": {
                "url": "https://127.0.0.1:9/none", "caBundle": base64.b64encode(pem).decode(),
            },
            "rules": [{"apiGroups": ["nothing.example"], "apiVersions": ["v1"],
                       "operations": ["CREATE"], "resources": ["nothings"]}],
        }],
    }  # fmt: skip
    control_plane.kubectl("apply", "-f", "-", input=json.dumps(config))
    try:
        assert kube.read_webhook_ca_bundle(name) == pem
    finally:
        control_plane.kubectl("delete", "validatingwebhookconfiguration", name)
    sa = f"sa-{uuid.uuid4().hex[:5]}"
    control_plane.kubectl("-n", namespace, "create", "serviceaccount", sa)
    token = control_plane.kubectl(
        "-n", namespace, "create", "token", sa, "--audience=kubehv-test"
    ).stdout.strip()
    good = kube.review_token(token, ["kubehv-test"])
    assert good["authenticated"] is True
    assert good["user"]["username"] == f"system:serviceaccount:{namespace}:{sa}"
    wrong_audience = kube.review_token(token, ["someone-else"])
    assert not wrong_audience.get("authenticated")
