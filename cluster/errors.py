"""The exceptions of the cluster package, one small tree.

    ClusterError                 anything the cluster layer cannot do
     +-- ConfigError             cluster.toml is missing, malformed or inconsistent
     |    +-- UsageError         a `fab` command was given an option it cannot use
     +-- ProvisionError          a provider could not create/start/delete/list VMs
     |    +-- StockoutError      a zone has no capacity (try the next zone)
     |    +-- QuotaError         a project quota is exhausted (raise it or use fewer VMs)
     +-- SSHError                a command could not be run over SSH on one host
     |    +-- HostKeyError       a host presented a key that is not the known one
     +-- GroupError              a fan-out where some hosts failed; carries every result
     +-- MountError              the SSHFS mount could not be made or is dead
     +-- StoreError              the bucket of an object-store share cannot be used
     +-- RecordError             a file on the share is malformed or forged: refused (bad input)
     +-- ResultError             what a VM printed for the laptop is malformed or forged: refused

Every message says what happened and how to fix it. The command line (fabfile.py)
decides how errors are shown and which exit code they carry.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


class ClusterError(Exception):
    """Base of every error raised by the cluster package."""


class ConfigError(ClusterError):
    """cluster.toml is missing, malformed or inconsistent (or a command was given bad options).

    `problems` are the located problems behind the message (cluster.schema.Problem), when
    it came from reading cluster.toml.
    """

    def __init__(self, message: str, problems: Sequence[object] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems)


class UsageError(ConfigError):
    """A `fab` command was given an option it cannot use (exit 2, one line saying what to type)."""


class ProvisionError(ClusterError):
    """A provider could not create, start, delete or list VMs."""


class StockoutError(ProvisionError):
    """A zone has no capacity for the requested machine type right now."""


class QuotaError(ProvisionError):
    """A project quota is exhausted."""


class SSHError(ClusterError):
    """A command could not be run over SSH on one host."""


class HostKeyError(SSHError):
    """A host presented a host key that does not match the cluster's known_hosts."""


class MountError(ClusterError):
    """The SSHFS mount could not be made, or is dead and could not be recovered."""


class StoreError(ClusterError):
    """The bucket of an object-store share (`[share] kind = "s3" | "gcs"`) cannot be used: it does not
    exist, the credentials may not use it, or its endpoint does not answer (the message says which)."""


class RecordError(ClusterError):
    """A file read from the share is malformed or forged: refused, naming the file.

    The share is untrusted input for the laptop (any VM, or anyone with the worker key, can
    write it): every such file is read by a validating reader (cluster.records). Like any
    bad input it is refused before work (exit 2); the fix is to delete the file.
    """


class ResultError(ClusterError):
    """What a VM printed for the laptop (an engine's JSON result, a sample) is malformed or forged.

    A VM someone controls can print anything (cluster.results): the VM failed (exit 1).
    """


class GroupError(ClusterError):
    """A fan-out in which at least one host failed.

    `results` maps every host to its result or to the exception it raised, so one
    failing host never hides what the others did.
    """

    def __init__(self, message: str, results: Mapping[str, Any]) -> None:
        super().__init__(message)
        self.results = dict(results)

    @property
    def failed(self) -> dict[str, BaseException]:
        return {h: r for h, r in self.results.items() if isinstance(r, BaseException)}

    @property
    def succeeded(self) -> dict[str, Any]:
        return {h: r for h, r in self.results.items() if not isinstance(r, BaseException)}
