"""Buckets of object stores (S3, GCS) behind one small interface; the SDKs load on first use.

    open_bucket("s3://BUCKET/PREFIX")  S3 through boto3 ('spotfan[s3]')                tasks/store/s3.py
    open_bucket("gs://BUCKET/PREFIX")  GCS through google-cloud-storage ('spotfan[gcs]') tasks/store/gcs.py

The object-store run root (tasks/store/root.py, run.py) stands on this layer. This module
is the only importer of the adaptors, each imported when its scheme is first used, so
`import tasks` never pays for boto3 or google-cloud-storage.
"""
from __future__ import annotations

import importlib

from tasks.store.bucket import Bucket, ObjectData, ObjectInfo, Prefix, Refused, Retries
from tasks.store.url import RootURL, parse_root

# scheme -> (adaptor module, Bucket class): imported on first use, so the SDKs are too
ADAPTORS = {"s3": ("tasks.store.s3", "S3Bucket"), "gs": ("tasks.store.gcs", "GcsBucket")}

__all__ = ["open_bucket", "parse_root", "RootURL", "Bucket", "ObjectInfo", "ObjectData", "Prefix", "Refused",
           "Retries", "ADAPTORS"]


def open_bucket(root: str | RootURL, *, retries: Retries = Retries()) -> Bucket:
    """The bucket of a root (`s3://BUCKET/PREFIX`, `gs://BUCKET/PREFIX`, checked by
    parse_root). No I/O: `check()` tells whether it can be used."""
    url = parse_root(root) if isinstance(root, str) else root
    module, name = ADAPTORS[url.scheme]
    return getattr(importlib.import_module(module), name)(url.bucket, retries=retries)
