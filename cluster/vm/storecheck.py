"""A headless VM's boot check: can this VM use the bucket (list, write, read back, delete under its prefix)?

boot.sh runs it instead of mounting a share. It uses the bucket as the VM is: its
instance role or service account (the lab: store.env's local endpoint), never a key
copied to it. It prints one line, `store: ok (...)` or `store: FAILED: why and the
fix`, and exits 0 only when every step worked, so a VM that cannot use the bucket fails
its boot and `fab up` stops it instead of leaving it billing while reporting ok.
"""
from __future__ import annotations

import argparse
import secrets
import sys

from cluster.bucket_share import AGENT_RETRIES, BucketShare
from cluster.errors import ClusterError
from cluster.records import CLUSTER_DIR
from tasks.errors import SpecError
from tasks.store.url import parse_root

PROBE_DIR = f"{CLUSTER_DIR}/probe"  # PROBE_DIR/<vm>: written, read back and deleted at each boot


def check(url: str, *, name: str) -> str:
    """What a working bucket looks like from this VM, in one line; ClusterError if it is not one."""
    try:
        root = parse_root(url)
    except SpecError as e:
        raise ClusterError(str(e)) from e
    rel = f"{PROBE_DIR}/{name}"
    token = secrets.token_hex(8)
    with BucketShare(root, retries=AGENT_RETRIES) as share:
        share.open()
        share.write_text(rel, token)
        if share.read_text(rel) != token:
            raise ClusterError(f"{share.where(rel)} did not read back what this VM wrote: is another "
                               f"VM named {name} using the same bucket?")
        share.remove(rel)
    return f"store: ok ({url}: list, write, read and delete as this VM)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--name", required=True, help="this VM's name")
    p.add_argument("url", help="the cluster's root, s3://BUCKET/PREFIX or gs://BUCKET/PREFIX")
    a = p.parse_args(argv)
    try:
        print(check(a.url, name=a.name))
    except ClusterError as e:
        print(f"store: FAILED: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
