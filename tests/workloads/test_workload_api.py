"""The API side of workloads: the model's rules, the VI -> driver spec translation, the CLI.

Why: a manifest with two disk sources or two kinds of user data must be refused where the
user is (the model; the CRD's CEL rules carry the same text), the agent must hand the driver
exactly what the manifest says, and ``kubehv ssh`` must say why it cannot connect yet.
"""

from __future__ import annotations

import argparse
from typing import Any

import pydantic
import pytest

from kubehv import api
from kubehv.api import virtualinstance as vi
from kubehv.cli import ssh
from kubehv.drivers import values
from kubehv.operator import translate

SHA = "a" * 64


def _spec(**kw: Any) -> dict[str, Any]:
    return {"memory": {"min": "64Mi", "max": "64Mi"}, **kw}


@pytest.mark.parametrize(
    ("disk", "ok"),
    [
        ({"path": "/var/lib/libvirt/images/a.img"}, True),
        ({"image": {"url": "https://example.org/d.qcow2", "sha256": SHA}}, True),
        ({"blank": {"size": "1Gi"}}, True),
        ({}, False),
        ({"path": "/x", "blank": {"size": "1Gi"}}, False),
        ({"image": {"url": "file:///etc/shadow", "sha256": SHA}}, False),
        ({"image": {"url": "https://example.org/d.qcow2", "sha256": "abc"}}, False),
        ({"image": {"url": "https://example.org/d.qcow2"}}, False),
        ({"blank": {"size": "1Gi"}, "name": "../x"}, False),
    ],
)
def test_one_disk_source(disk: dict[str, Any], ok: bool) -> None:
    data = _spec(disks=[disk])
    if ok:
        vi.VirtualInstanceSpec.model_validate(data)
    else:
        with pytest.raises(pydantic.ValidationError):
            vi.VirtualInstanceSpec.model_validate(data)


def test_user_data_or_secret_not_both() -> None:
    both = {"userData": "#cloud-config\n", "userDataSecretRef": {"name": "s", "key": "k"}}
    with pytest.raises(pydantic.ValidationError, match="not both"):
        vi.VirtualInstanceSpec.model_validate(_spec(cloudInit=both))


def test_translate_workload_spec() -> None:
    body = {
        "metadata": {"name": "web", "namespace": "team-a", "uid": "u-1"},
        "spec": _spec(
            firmware="uefi",
            disks=[
                {"name": "root", "bootOrder": 1, "image": {
                    "url": "https://example.org/d.qcow2", "sha256": SHA, "size": "2Gi"}},
                {"blank": {"size": "1Gi"}, "deletePolicy": "Retain"},
                {"path": "/var/lib/libvirt/images/a.img", "format": "qcow2"},
            ],
            nics=[{"type": "network"}],
            cloudInit={"userData": "inline", "sshAuthorizedKeys": ["ssh-ed25519 A k"]},
        ),
    }  # fmt: skip
    spec = translate.instance_spec(body, user_data="from-secret")
    root, blank, host = spec.disks
    assert root.source is values.DiskSource.IMAGE and root.boot_order == 1
    assert root.image == values.ImageRef("https://example.org/d.qcow2", SHA)
    assert root.size_bytes == 2 << 30 and root.path == ""
    assert blank.source is values.DiskSource.BLANK and blank.size_bytes == 1 << 30
    assert blank.delete_policy is values.DeletePolicy.RETAIN
    assert host.source is values.DiskSource.HOST_PATH and host.format is values.DiskFormat.QCOW2
    assert spec.nics[0].source is None  # the node's NAT network
    assert spec.firmware is values.Firmware.UEFI and spec.namespace == "team-a"
    assert spec.cloud_init == values.CloudInit(
        "u-1", "web", "from-secret", None, ("ssh-ed25519 A k",)
    )
    assert translate.instance_spec(body).cloud_init.user_data == "inline"  # type: ignore[union-attr]


def _vi(status: dict[str, Any]) -> api.VirtualInstance:
    body = {"metadata": {"name": "web"}, "spec": _spec(), "status": status}
    return api.VirtualInstance.model_validate(body)


MAC = "52:54:00:00:00:01"


def test_ssh_address_and_command() -> None:
    running = {
        "phase": "Running",
        "interfaces": [{"name": "ens2", "mac": MAC, "ipAddresses": ["10.0.0.5"]}],
    }
    assert ssh.address(_vi(running)) == "10.0.0.5"
    with pytest.raises(LookupError, match="not running"):
        ssh.address(_vi({"phase": "Stopped"}))
    with pytest.raises(LookupError, match="no address yet"):
        ssh.address(_vi({"phase": "Running", "interfaces": [{"name": "ens2", "mac": MAC}]}))
    with pytest.raises(LookupError, match="no network interface 0"):
        ssh.address(_vi({"phase": "Running"}))
    args = argparse.Namespace(
        identity="/k", jump="me@node", user="debian", command=["--", "uptime"]
    )
    assert ssh.ssh_command(args, "10.0.0.5") == [
        "ssh", "-i", "/k", "-J", "me@node", "debian@10.0.0.5", "uptime",
    ]  # fmt: skip
