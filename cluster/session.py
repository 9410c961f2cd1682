"""One cluster for one command: its config, provider, SSH access and share, each opened on first use, closed once.

Every `fab` command builds one `Cluster` from cluster.toml and hands it to the functions
that need any of these (Fabric's `Connection` is the model: made without I/O, connected
on first use, closed once with `with`). No other module builds a provider, an SSH
access or an SFTP session from the config.
"""
from __future__ import annotations

from dataclasses import replace

from cluster.config import ClusterConfig
from cluster.errors import ClusterError
from cluster.providers import provider_for
from cluster.providers.base import HeadLocation, HeadVM, Provider
from cluster.share import Share
from cluster.ssh import Host, Remote


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

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the share, every kept SSH connection and the provider's clients (each once)."""
        share, remote, provider = self._share, self._remote, self._provider
        self._share = self._remote = None
        try:
            if share is not None:
                share.close()
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
            if isinstance(self.provider, HeadVM):
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
    def share(self) -> Share:
        """The head's shared directory over SFTP, as its jailed user (connected on first use)."""
        if self._share is None:
            h = self.config.head
            self._share = Share(remote=self.remote, head=Host(name="head", address=h.address, port=h.port),
                                user=h.user, root=h.sftp_share)
        return self._share


def _pointed_at(config: ClusterConfig, head: HeadLocation) -> ClusterConfig:
    return replace(config, head=replace(config.head, address=head.address, host_keys=head.known_hosts))
