"""One cluster for one command: its config, provider, SSH access and share, each opened on first use, closed once.

Every `fab` command builds one `Cluster` from cluster.toml and hands it to the functions
that need any of these (Fabric's `Connection` is the model: made without I/O, connected
on first use, closed once with `with`). No other module builds a provider, an SSH
access, an SFTP session or a bucket client from the config.

`board` is where the cluster's own records live (cluster.records: run requests, done
records, heartbeats, logs), whatever the share is: the head's folder over SFTP (`Share`)
or, on a headless cluster (`[share] kind = "s3" | "gcs"`), the bucket (`BucketShare`).
Both have the methods the records need (`Board`). `share` is the head's folder only, for
what needs SFTP itself (`fab push/pull`, `--ship`).
"""
from __future__ import annotations

from dataclasses import replace

from cluster.bucket_share import BucketShare
from cluster.config import ClusterConfig
from cluster.errors import ClusterError
from cluster.providers import provider_for
from cluster.providers.base import HeadLocation, HeadVM, Provider
from cluster.share import Share
from cluster.ssh import Host, Remote

Board = Share | BucketShare  # where cluster.records' files are: the head's folder, or the bucket


class Cluster:
    """The provider, the SSH access to the VMs and the share of one cluster. Constructing it does no I/O.

    `provider`: one made already (tests hand in one with short waits); default: the
    registry's for `config`.
    """

    def __init__(self, config: ClusterConfig, *, provider: Provider | None = None) -> None:
        self._given = config
        self._config: ClusterConfig | None = None
        self._provider = provider
        self._remote: Remote | None = None
        self._share: Share | None = None
        self._bucket: BucketShare | None = None

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the share, every kept SSH connection and the provider's clients (each once)."""
        share, bucket, remote, provider = self._share, self._bucket, self._remote, self._provider
        self._share = self._remote = self._bucket = None
        try:
            if share is not None:
                share.close()
            if bucket is not None:
                bucket.close()
        finally:
            try:
                if remote is not None:
                    remote.close()
            finally:
                if provider is not None:
                    provider.close()

    @property
    def provider(self) -> Provider:
        if self._provider is None:
            self._provider = provider_for(self._given)
        return self._provider

    @property
    def config(self) -> ClusterConfig:
        """cluster.toml as parsed, pointed at the head VM the provider made, if it made one."""
        if self._config is None:
            config = self._given
            if not self.headless and isinstance(self.provider, HeadVM):
                saved = self.provider.saved_head()
                if saved is not None:
                    config = _pointed_at(config, saved)
            self._config = config
        return self._config

    def use_head(self, head: HeadLocation) -> None:
        """From now on, the head is this VM (`fab up` has just made it); before the share is opened."""
        if self._share is not None:
            raise ClusterError("internal: the head moved after the share was opened")
        self._config = _pointed_at(self.config, head)

    @property
    def remote(self) -> Remote:
        """SSH to the VMs as cluster.toml's [ssh] user and key, host keys from its known_hosts only."""
        if self._remote is None:
            s = self.config.ssh
            self._remote = Remote(user=s.user, key=s.key, known_hosts=s.known_hosts,
                                  connect_timeout=s.connect_timeout, command_timeout=s.command_timeout)
        return self._remote

    @property
    def headless(self) -> bool:
        """Whether the share is a bucket (no head, no mount)."""
        return self._given.share.headless

    @property
    def board(self) -> Board:
        """Where cluster.records' files are: the bucket on a headless cluster, else the head's share."""
        url = self._given.share.url
        if url is None:
            return self.share
        if self._bucket is None:
            self._bucket = BucketShare(url)
        return self._bucket

    @property
    def share(self) -> Share:
        """The head's shared directory over SFTP, as its jailed user (connected on first use);
        a ConfigError on a headless cluster, whose share is a bucket."""
        if self._share is None:
            h = self.config.the_head()
            self._share = Share(remote=self.remote, head=Host(name="head", address=h.address, port=h.port),
                                user=h.user, root=h.sftp_share, kex_algorithms=self.config.ssh.kex_algorithms)
        return self._share


def _pointed_at(config: ClusterConfig, head: HeadLocation) -> ClusterConfig:
    return replace(config, head=replace(config.the_head(), address=head.address, host_keys=head.known_hosts))
