"""Object-store roots as written on a command line: `s3://BUCKET/PREFIX`, `gs://BUCKET/PREFIX`.

`parse_root` checks the bucket name against the naming rules of its store and the prefix
against the object-name rules of both, so a typo is refused before any request with a
message that says how to write it. No I/O: whether the bucket exists is the adaptor's
`check()`.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Literal

from tasks.errors import SpecError

Scheme = Literal["s3", "gs"]
SCHEMES: dict[str, str] = {"s3": "Amazon S3", "gs": "Google Cloud Storage"}
# Common misspellings of a scheme, and what was meant.
_MEANT = {"gcs": "gs", "gc": "gs", "google": "gs", "s3a": "s3", "s3n": "s3", "aws": "s3"}
MAX_NAME_BYTES = 1024  # both stores: an object name is at most 1,024 bytes of UTF-8
PREFIX_ROOM = 256  # bytes a prefix leaves for the names spotfan puts under it
_S3_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_S3_RESERVED_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
_S3_RESERVED_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")
_GCS_PART = re.compile(r"[a-z0-9]([a-z0-9_-]*[a-z0-9])?")
_GCS_GOOGLE = re.compile(r"g[o0]{2}g[l1]e")  # GCS refuses "google" and close misspellings


@dataclass(frozen=True)
class RootURL:
    """A checked object-store root."""

    scheme: Scheme  # "s3" or "gs"
    bucket: str  # the bucket name, valid for its store
    prefix: str  # "" (the whole bucket) or "a/b/": always ends with "/" when not empty
    url: str  # the root as the user wrote it

    def key(self, rel: str) -> str:
        """The object name of `rel` (a "/"-separated path relative to the root)."""
        return self.prefix + rel.lstrip("/")

    def where(self, name: str) -> str:
        """An object's URL, as a user finds it in the console or CLI."""
        return f"{self.scheme}://{self.bucket}/{name}"


def parse_root(text: str) -> RootURL:
    """`text` (`s3://BUCKET/PREFIX` or `gs://BUCKET/PREFIX`) checked; SpecError saying how
    to fix it otherwise."""
    scheme, sep, rest = text.partition("://")
    if not sep:
        raise SpecError(f"root {text!r} is not an object-store URL; write s3://BUCKET/PREFIX or gs://BUCKET/PREFIX")
    if scheme not in SCHEMES:
        meant = _MEANT.get(scheme.lower(), scheme.lower() if scheme.lower() in SCHEMES else None)
        hint = f"did you mean {meant}://{rest}? " if meant else ""
        raise SpecError(f"root {text!r}: unknown scheme {scheme!r}; {hint}"
                        "spotfan reads s3://BUCKET/PREFIX (Amazon S3) and gs://BUCKET/PREFIX (Google Cloud Storage)")
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise SpecError(f"root {text!r} names no bucket; write {scheme}://BUCKET/PREFIX")
    problem = (s3_bucket_problem if scheme == "s3" else gcs_bucket_problem)(bucket)
    if problem:
        raise SpecError(f"root {text!r}: {SCHEMES[scheme]} bucket name {bucket!r} {problem}")
    return RootURL(scheme=scheme, bucket=bucket, prefix=_checked_prefix(prefix, text),  # type: ignore[arg-type]
                   url=text)


def s3_bucket_problem(name: str) -> str | None:
    """Why `name` is not a valid S3 (general purpose) bucket name, or None."""
    if not 3 <= len(name) <= 63:
        return f"has {len(name)} characters; S3 bucket names have 3 to 63"
    if bad := _bad_chars(name, "abcdefghijklmnopqrstuvwxyz0123456789.-"):
        return (f"has {bad}; S3 bucket names use only lowercase letters, digits, dots and hyphens "
                f"(write it as the S3 console lists it, e.g. {_suggest(name, '-')!r})")
    if not _S3_BUCKET.fullmatch(name):
        return "must begin and end with a lowercase letter or a digit"
    if ".." in name:
        return "has two dots in a row, which S3 refuses"
    if _is_ip(name):
        return "looks like an IP address, which S3 refuses as a bucket name"
    if name.startswith(_S3_RESERVED_PREFIXES) or name.endswith(_S3_RESERVED_SUFFIXES):
        return ("uses a prefix or suffix S3 reserves (xn--, sthree-, amzn-s3-demo-, -s3alias, --ol-s3, .mrap, --x-s3, "
                "--table-s3)")
    return None


def gcs_bucket_problem(name: str) -> str | None:
    """Why `name` is not a valid Cloud Storage bucket name, or None."""
    if bad := _bad_chars(name, "abcdefghijklmnopqrstuvwxyz0123456789._-"):
        return (f"has {bad}; Cloud Storage bucket names use only lowercase letters, digits, dashes, underscores "
                f"and dots (write it as `gcloud storage ls` lists it, e.g. {_suggest(name, '-')!r})")
    parts = name.split(".")
    if not 3 <= len(name) <= (222 if len(parts) > 1 else 63):
        return (f"has {len(name)} characters; Cloud Storage bucket names have 3 to 63 "
                "(up to 222 when dotted, each dot-separated part at most 63)")
    if any(not part or len(part) > 63 or not _GCS_PART.fullmatch(part) for part in parts):
        return ("must begin and end with a lowercase letter or a digit, and so must every dot-separated part "
                "(at most 63 characters each)")
    if _is_ip(name):
        return "looks like an IP address, which Cloud Storage refuses as a bucket name"
    if name.startswith("goog") or _GCS_GOOGLE.search(name):
        return "begins with 'goog' or contains 'google' (or a close misspelling), which Cloud Storage refuses"
    return None


def _checked_prefix(prefix: str, text: str) -> str:
    if not prefix.strip("/"):
        if prefix:
            raise SpecError(f"root {text!r}: the prefix is only slashes; write the bucket alone "
                            f"({text.split('://')[0]}://BUCKET) or a prefix without empty parts")
        return ""
    parts = prefix.rstrip("/").split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise SpecError(f"root {text!r}: the prefix {prefix!r} has an empty, '.' or '..' part; "
                        "object names are not paths, so write each part once, e.g. runs/2026-12/")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in prefix):
        raise SpecError(f"root {text!r}: the prefix has a control character (a newline?); remove it")
    normal = "/".join(parts) + "/"
    if len(normal.encode("utf-8")) > MAX_NAME_BYTES - PREFIX_ROOM:
        raise SpecError(f"root {text!r}: the prefix is {len(normal.encode())} bytes long; object names are at most "
                        f"{MAX_NAME_BYTES} bytes, so keep the prefix under {MAX_NAME_BYTES - PREFIX_ROOM}")
    return normal


def _bad_chars(name: str, allowed: str) -> str:
    bad = sorted(set(c for c in name if c not in allowed))
    return ", ".join(repr(c) for c in bad)


def _suggest(name: str, sep: str) -> str:
    return re.sub(r"[^a-z0-9.-]+", sep, name.lower()).strip(".-") or "my-bucket"


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True
