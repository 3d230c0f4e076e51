"""The cloud-init NoCloud seed: a small ISO labelled ``cidata`` the guest reads at boot.

Why this module exists: cloud-init's NoCloud datasource is the one way to hand a stock cloud
image its SSH keys and user data without a metadata server. The ISO holds ``meta-data``
(instance-id and hostname, from the object), ``user-data`` (the manifest's or the Secret's,
with ``sshAuthorizedKeys`` merged in) and, when given, ``network-config``. It is built with
pycdlib (pure Python, no external tool). User data may be secret: it goes into the ISO file
(0600, in the instance's own folder) and nowhere else -- not into logs or messages.
"""

from __future__ import annotations

import io
import json
import os
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

import pycdlib
import yaml

from kubehv.drivers import values
from kubehv.drivers.storage import errors

CLOUD_CONFIG = "#cloud-config"


def meta_data(seed: values.CloudInit) -> str:
    return json.dumps({"instance-id": seed.instance_id, "local-hostname": seed.hostname}) + "\n"


def user_data(seed: values.CloudInit) -> str:
    """The user-data file: the given data, with the SSH keys merged in (never quoted in errors)."""
    keys = list(seed.ssh_authorized_keys)
    data = seed.user_data
    if data is None or not data.strip():
        return CLOUD_CONFIG + "\n" + yaml.safe_dump({"ssh_authorized_keys": keys}, sort_keys=True)
    if not keys:
        return data
    if data.lstrip().startswith(CLOUD_CONFIG):
        try:
            config = yaml.safe_load(data)
        except yaml.YAMLError:
            raise errors.CloudInitError(
                "cloudInit user data starts with #cloud-config but is not valid YAML"
            ) from None
        if config is None:
            config = {}
        if not isinstance(config, dict):
            raise errors.CloudInitError("cloudInit #cloud-config user data must be a YAML mapping")
        existing = config.get("ssh_authorized_keys") or []
        if not isinstance(existing, list):
            raise errors.CloudInitError("ssh_authorized_keys in the user data must be a list")
        config["ssh_authorized_keys"] = [*existing, *(k for k in keys if k not in existing)]
        return CLOUD_CONFIG + "\n" + yaml.safe_dump(config, sort_keys=True)
    # A script or another format: cloud-init's multipart form carries both parts.
    parts = MIMEMultipart()
    keys_part = CLOUD_CONFIG + "\n" + yaml.safe_dump({"ssh_authorized_keys": keys})
    parts.attach(MIMEText(keys_part, "cloud-config"))
    subtype = "x-shellscript" if data.startswith("#!") else "plain"
    parts.attach(MIMEText(data, subtype))
    return parts.as_string()


def files(seed: values.CloudInit) -> dict[str, bytes]:
    out = {
        "meta-data": meta_data(seed).encode(),
        "user-data": user_data(seed).encode(),
    }
    if seed.network_data:
        out["network-config"] = seed.network_data.encode()
    return out


_ISO_NAMES = {
    "meta-data": "/METADATA.;1",
    "user-data": "/USERDATA.;1",
    "network-config": "/NETCFG.;1",
}


def write_iso(seed: values.CloudInit, path: str) -> None:
    """Write the ``cidata`` ISO to ``path`` atomically (a temp file, then rename), mode 0600."""
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident="cidata")
    for name, data in files(seed).items():
        iso.add_fp(
            io.BytesIO(data), len(data), _ISO_NAMES[name], rr_name=name, joliet_path=f"/{name}"
        )
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            iso.write_fp(fh)
        os.rename(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        iso.close()
