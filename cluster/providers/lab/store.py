"""A headless lab's stand-in for an instance role: the local object store's endpoint and test credentials.

A cloud VM reaches a bucket as itself (a GCE service account, an EC2 instance profile);
a lab VM has no such identity, so `fab up` hands it what this machine's environment
says about a store on this machine: moto's `AWS_ENDPOINT_URL` and its test keys, or a
GCS emulator's `STORAGE_EMULATOR_HOST`. Only an endpoint on loopback is handed on: real
cloud keys are never copied to a VM, not even a lab VM.
"""
from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from urllib.parse import urlsplit

from cluster.errors import ProvisionError

# What boto3 needs for moto, and what keeps it from looking anywhere else (a profile, an
# instance metadata service).
S3_PASSED = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
             "AWS_DEFAULT_REGION", "AWS_REGION")
S3_FIXED = {"AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": "/dev/null",
            "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}
GCS_PASSED = ("STORAGE_EMULATOR_HOST", "GOOGLE_CLOUD_PROJECT")
GCS_FIXED = {"NO_GCE_CHECK": "True"}


def store_env(scheme: str, environ: Mapping[str, str]) -> dict[str, str]:
    """The lab VMs' store variables for `scheme` ("s3" or "gs"), from `environ` (this machine's);
    ProvisionError when the store is not on loopback (or not named at all)."""
    endpoint_var, passed, fixed = (("AWS_ENDPOINT_URL", S3_PASSED, S3_FIXED) if scheme == "s3"
                                   else ("STORAGE_EMULATOR_HOST", GCS_PASSED, GCS_FIXED))
    endpoint = environ.get(endpoint_var, "")
    example = "AWS_ENDPOINT_URL=http://127.0.0.1:5000 (moto)" if scheme == "s3" else \
        "STORAGE_EMULATOR_HOST=http://127.0.0.1:9023 (a GCS emulator)"
    if not endpoint:
        raise ProvisionError(
            f"a headless lab uses a store on this machine, and {endpoint_var} is not set: start one and "
            f"set {example} before `fab up` (the lab's VMs have no instance role; docs/objstore.md)")
    if not _loopback(endpoint):
        raise ProvisionError(
            f"{endpoint_var}={endpoint!r} is not on loopback: a lab VM gets a store's credentials only "
            f"for a store on this machine (127.0.0.0/8), never a cloud's; set {example}")
    return {**{k: environ[k] for k in passed if environ.get(k)}, **fixed}


def _loopback(endpoint: str) -> bool:
    host = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
