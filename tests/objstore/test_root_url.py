"""Object-store roots as a user types them: what is accepted, and what each refusal says."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tasks.errors import SpecError
from tasks.store import parse_root

CHILD_TIMEOUT_S = 60


def test_a_root_gives_scheme_bucket_and_a_prefix_ending_in_a_slash():
    root = parse_root("s3://my-data.bucket/runs/2026-12")
    assert (root.scheme, root.bucket, root.prefix) == ("s3", "my-data.bucket", "runs/2026-12/")
    assert root.key("out/a.txt") == "runs/2026-12/out/a.txt"
    assert root.where(root.key("out/a.txt")) == "s3://my-data.bucket/runs/2026-12/out/a.txt"
    assert parse_root("gs://my_bucket_1").prefix == ""
    assert parse_root("gs://my_bucket_1/").prefix == ""
    assert parse_root("gs://a.b.c/x/y/").prefix == "x/y/"


@pytest.mark.parametrize("url, says", [
    ("/mnt/share", "write s3://BUCKET/PREFIX or gs://BUCKET/PREFIX"),
    ("gcs://bkt/run", "did you mean gs://bkt/run?"),
    ("S3://bkt/run", "did you mean s3://bkt/run?"),
    ("ftp://bkt/run", "unknown scheme 'ftp'"),
    ("s3:///run", "names no bucket; write s3://BUCKET/PREFIX"),
    ("s3://My_Bucket/run", "use only lowercase letters, digits, dots and hyphens"),
    ("s3://my_bucket/run", "'_'"),
    ("s3://ab/run", "has 2 characters; S3 bucket names have 3 to 63"),
    ("s3://" + "a" * 64 + "/run", "has 64 characters"),
    ("s3://-bucket/run", "must begin and end with a lowercase letter or a digit"),
    ("s3://my..bucket/run", "two dots in a row"),
    ("s3://192.168.5.4/run", "looks like an IP address"),
    ("s3://xn--bucket/run", "reserves"),
    ("s3://bucket-s3alias/run", "reserves"),
    ("gs://My-Bucket/run", "use only lowercase letters, digits, dashes, underscores and dots"),
    ("gs://goog-data/run", "begins with 'goog'"),
    ("gs://my-g00gle-data/run", "contains 'google'"),
    ("gs://a.-b/run", "every dot-separated part"),
    ("gs://" + "a" * 64 + "/run", "3 to 63"),
    ("s3://bucket//run", "has an empty, '.' or '..' part"),
    ("s3://bucket/a/../b", "has an empty, '.' or '..' part"),
    ("s3://bucket///", "the prefix is only slashes"),
    ("gs://bucket/a\nb", "control character"),
    ("s3://bucket/" + "p" * 900, "keep the prefix under 768"),
])
def test_a_bad_root_is_refused_saying_how_to_fix_it(url, says):
    with pytest.raises(SpecError) as caught:
        parse_root(url)
    assert says in str(caught.value)
    assert repr(url) in str(caught.value)  # the message quotes what was typed


def test_importing_tasks_and_the_store_package_loads_no_sdk():
    s3_only = ("import sys, tasks, tasks.store\n"
               "tasks.store.open_bucket('s3://some-bucket/x')\n"
               "assert 'google.cloud.storage' not in sys.modules, 'gcs loaded'\n"
               "assert 'boto3' in sys.modules\n"
               "print('ok')\n")
    bare = ("import sys, tasks, tasks.store\n"
            "from tasks.store import parse_root, Bucket, ObjectInfo\n"
            "parse_root('gs://some-bucket/x')\n"
            "sdks = ('boto3', 'botocore', 'google.cloud.storage', 'google.auth')\n"
            "print(sorted(m for m in sdks if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", bare], capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    assert (done.returncode, done.stdout.strip()) == (0, "[]"), done.stderr
    done = subprocess.run([sys.executable, "-c", s3_only], capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr
