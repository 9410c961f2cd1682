"""The EC2 provider's workers: spot instances created, healed and terminated by tag, with capacity failover.

Every instance carries the tags `spotfan-cluster=<cluster>`, `spotfan-role=worker` and
`Name=<vm name>`; those tags, not local state, are what `create`, `list`, `start` and
`delete` work from, so each is safe to run twice and from any laptop. A VM that finds
no capacity (InsufficientInstanceCapacity, SpotMaxPriceTooLow, 5xx, ...) moves to the next
zone (or subnet) of [aws], then to the next instance type; a quota error stops the search.
"""
from __future__ import annotations

import logging
import re
import shlex
import uuid
from collections.abc import Sequence
from dataclasses import replace
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from cluster.errors import ConfigError, GroupError, ProvisionError, StockoutError
from cluster.fanout import failed, fan_out, first_failure
from cluster.providers.aws.api import Ec2Api
from cluster.providers.aws.bodies import (
    KEY_BASE64,
    KEY_TYPE,
    Launch,
    address_of,
    client_token,
    interrupted,
    name_of,
    run_request,
    shell_script,
    status_of,
    user_data,
    zone_of,
)
from cluster.providers.aws.calls import Ec2, Timing
from cluster.providers.aws.cost import CostEstimate, estimate_hourly_cost
from cluster.providers.aws.settings import AwsSettings
from cluster.providers.base import Charge, Instance, Status
from cluster.providers.failover import place, raise_unplaced
from cluster.ssh_keys import host_pattern

logger = logging.getLogger(__name__)

MAX_PARALLEL_CALLS = 8  # concurrent API calls in one fan-out
_VM_NAME = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
# A stopped instance EC2 will not start but not for capacity (a stopped spot instance that only
# the Spot service may start): a worker holds no state, so it is terminated and launched again.
_RELAUNCH_CODES = ("IncorrectSpotRequestState", "IncorrectInstanceState")


class AwsProvider:
    """Worker instances on EC2, found by tag. Constructing it does no I/O.

    `boot_script` (run by the user-data at every boot), `spot_notice` (the IMDS watch) and
    `ssh_public_key` (imported as the key pair) are text, or files read on first use.
    """

    def __init__(self, settings: AwsSettings, *, cluster_name: str, boot_script: str | Traversable,
                 spot_notice: str | Traversable, ssh_public_key: str | Path, ssh_user: str,
                 api: Ec2Api | None = None, timing: Timing = Timing(), idle_action: str = "stop",
                 unprovisioned_stop_s: float | None = None) -> None:
        if not re.match(r"^[a-z][a-z0-9-]{0,40}$", cluster_name):
            raise ConfigError(f"cluster name {cluster_name!r} cannot be used on AWS: use lowercase letters, "
                              f"digits and '-', starting with a letter, at most 41 characters")
        self.settings = settings
        self.cluster_name = cluster_name
        self.ssh_user = ssh_user
        self.idle_action = idle_action  # "stop" or "delete": the instance's InstanceInitiatedShutdownBehavior
        self.unprovisioned_stop_s = unprovisioned_stop_s  # None: no unprovisioned guard (provider tests)
        self.api = api or Ec2Api(region=settings.region, profile=settings.profile)
        self.ec2 = Ec2(self.api, cluster_name=cluster_name, timing=timing, public=settings.public_ip)
        self._boot_script = boot_script
        self._spot_notice = spot_notice
        self._ssh_public_key = ssh_public_key
        self._gpus: int | None = None  # GPUs per worker, once EC2 described the instance types

    @property
    def timing(self) -> Timing:
        return self.ec2.timing

    @timing.setter
    def timing(self, value: Timing) -> None:
        self.ec2.timing = value

    def __enter__(self) -> AwsProvider:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.api.close()

    # --- the Provider protocol ---------------------------------------------------------

    def create(self, names: Sequence[str]) -> list[Instance]:
        """Launch the missing workers (capacity failover), start stopped ones, wait until they run."""
        _check_names(names)
        existing = self.ec2.list_raw()
        reused = [n for n in names if n in existing]
        if reused:
            logger.info("reusing %d existing instance(s): %s", len(reused), ", ".join(reused))
        self._launch([n for n in names if n not in existing])
        stopped = [n for n in reused if status_of(existing[n]) is Status.TERMINATED]
        if stopped:
            self.start(stopped)
        return self._booted(names)

    def list(self) -> list[Instance]:
        raw = self.ec2.list_raw()
        return [self._to_instance(raw[n]) for n in sorted(raw)]

    def start(self, names: Sequence[str]) -> list[Instance]:
        """Start stopped workers; launch gone ones again, and elsewhere those EC2 will not start."""
        _check_names(names)
        existing = self.ec2.wait_settled(
            [n for n in names if n in self.ec2.list_raw()], settled=(Status.RUNNING, Status.TERMINATED),
            timeout_s=self.timing.stopping_timeout_s, what="stopped or running")
        gone = [n for n in names if n not in existing]
        stopped = [n for n in names if n in existing and status_of(existing[n]) is Status.TERMINATED]
        results = self._fan_out(stopped, lambda n: self.ec2.start(existing[n]["InstanceId"], doing=f"starting {n}"))
        # No capacity for it where it is (a stockout), or a start only EC2 may do (a stopped spot
        # instance): a worker holds no state, so it is terminated and launched again.
        full = [n for n, r in results.items() if isinstance(r, StockoutError)]
        refused = full + [n for n, r in results.items() if isinstance(r, ProvisionError) and n not in full and any(
            c in str(r) for c in _RELAUNCH_CODES)]
        bad = {n: r for n, r in failed(results).items() if n not in refused}
        if bad:
            raise GroupError(f"could not start {', '.join(sorted(bad))}: {first_failure(bad)}", results)
        for n in refused:
            logger.warning("%s cannot be started (%s); terminating it and launching it again%s", n, results[n],
                           " elsewhere first" if n in full else "")
            self.ec2.terminate(existing[n], doing=f"terminating {n}")
        if refused:
            self.ec2.wait_gone(refused)
        if gone:
            logger.info("launching %d worker(s) that are gone: %s", len(gone), ", ".join(gone))
        self._launch(gone + [n for n in refused if n not in full])
        for where in sorted({self._where(existing[n]) for n in full}):
            # Where it could not start is tried last: every other zone, then every other type.
            self._launch([n for n in full if self._where(existing[n]) == where], last=where)
        again = set(gone) | set(refused)
        return [replace(i, recreated=True) if i.name in again else i for i in self._booted(names)]

    def stop(self, names: Sequence[str]) -> None:
        """Stop the named workers (their volumes stay); missing or stopped ones are fine."""
        existing = self.ec2.list_raw()
        targets = [n for n in names if n in existing and status_of(existing[n]) is not Status.TERMINATED]
        results = self._fan_out(targets, lambda n: self.ec2.stop(existing[n]["InstanceId"], doing=f"stopping {n}"))
        bad = failed(results)
        if bad:
            raise GroupError(f"could not stop {', '.join(sorted(bad))}: {first_failure(bad)}", results)

    def delete(self, names: Sequence[str]) -> None:
        """Terminate the named workers (their spot requests cancelled first) and list until none is live.

        Once the cluster has no live instance at all (its head included), the security group
        and key pair that spotfan made for it are deleted too.
        """
        existing = self.ec2.list_raw()
        targets = [n for n in names if n in existing]
        results = self._fan_out(targets, lambda n: self.ec2.terminate(existing[n], doing=f"terminating {n}"))
        bad = failed(results)
        if bad:
            raise GroupError(f"could not terminate {', '.join(sorted(bad))}: {first_failure(bad)}", results)
        left = self.ec2.wait_gone(names)
        if left:
            raise ProvisionError(
                f"still live after terminate: {', '.join(left)}; run `fab down` again, or `aws ec2 "
                f"describe-instances --filters Name=tag:spotfan-cluster,Values={self.cluster_name}`")
        logger.info("terminated %d instance(s); none of %d named is live", len(targets), len(names))
        if not self.ec2.list_raw(role=None):  # a head instance of the cluster uses them too
            if self.settings.spot:
                self.ec2.cancel_open_requests()
            for what in self.ec2.delete_created(group=self.settings.security_group, key_pair=self.settings.key_pair):
                logger.info("deleted %s (spotfan made it; no instance uses it now)", what)

    def host_keys(self, names: Sequence[str]) -> dict[str, list[str]]:
        """`known_hosts` lines per worker, from the host keys cloud-init printed to its console.

        A running or booting worker is waited for until they appear (else refused); a
        stopped or missing one gets no lines (nothing to trust until it runs again).
        """
        existing = self.ec2.list_raw()
        live = [n for n in names if n in existing and status_of(existing[n]) in (Status.RUNNING, Status.PROVISIONING)]
        results = self._fan_out(live, lambda n: self._known_hosts_lines(n, existing[n]))
        bad = failed(results)
        if bad:
            raise GroupError(f"no host keys for {', '.join(sorted(bad))}: {first_failure(bad)}", results)
        return {n: results.get(n, []) for n in names}  # type: ignore[misc]

    # --- capabilities: SelfStopping, Priced, Accelerated --------------------------------

    def gpus_per_vm(self) -> int:
        """The NVIDIA GPUs of every worker, from EC2's description of [aws] instance_types (looked
        up once per provider); 0 for CPU types. The types must agree: a worker that fails over to
        the next type must have the GPUs its agent checks for and shares out."""
        if self._gpus is None:
            s = self.settings
            described = self.ec2.gpus_of(s.instance_types)
            other = {t: sorted({m for m, _ in g if m.upper() != "NVIDIA"}) for t, g in described.items()}
            other = {t: m for t, m in other.items() if m}
            if other:
                t = sorted(other)[0]
                raise ConfigError(f"[aws] instance_types: {t} has {', '.join(other[t])} GPUs; spotfan checks and "
                                  "shares out NVIDIA GPUs only (nvidia-smi, CUDA_VISIBLE_DEVICES): pick NVIDIA "
                                  "GPU types (g4dn, g5, g6, p3, p4d, ...) or CPU types")
            counts = {t: sum(n for _, n in g) for t, g in described.items()}
            if len(set(counts.values())) > 1:
                listed = ", ".join(f"{t} {counts[t]}" for t in s.instance_types)
                raise ConfigError(f"[aws] instance_types have different GPU counts ({listed}): every worker must "
                                  "have as many GPUs as the others, list types with the same count")
            self._gpus = counts[s.instance_types[0]]
            if self._gpus:
                logger.info("%s: %d NVIDIA GPU(s) per worker", s.instance_types[0], self._gpus)
        return self._gpus


    @property
    def self_stop_command(self) -> str:
        """An OS shutdown: the instance's InstanceInitiatedShutdownBehavior makes it a stop or a terminate."""
        return "/sbin/shutdown -h now" if self.ssh_user == "root" else "sudo -n /sbin/shutdown -h now"

    def self_stop_env(self, instance: Instance) -> dict[str, str]:
        return {"SPOTFAN_STOP_COMMAND": self.self_stop_command}

    def cost_estimate(self, workers: int) -> CostEstimate:
        s = self.settings
        return estimate_hourly_cost(s.prices, instance_type=s.instance_types[0], workers=workers, market=s.market)

    def describe_cost(self, workers: int) -> str:
        return self.cost_estimate(workers).describe()

    def billing(self, instances: Sequence[Instance]) -> list[Charge]:
        """Running workers (at the first type's price) and stopped workers' volumes (unpriced)."""
        s = self.settings
        running = [i for i in instances if i.status is not Status.TERMINATED]
        stopped = [i for i in instances if i.status is Status.TERMINATED]
        out = []
        if running:
            out.append(Charge(f"{len(running)} running worker(s) ({s.instance_types[0]}, {s.market})",
                              self.cost_estimate(len(running)).total_hour))
        if stopped:
            out.append(Charge(f"{len(stopped)} stopped worker(s)' volumes ({s.disk_size_gb} GB {s.volume_type} each)",
                              None))
        return out

    # --- inside ------------------------------------------------------------------------

    def _launch(self, names: Sequence[str], *,
                last: tuple[str, str | None] | None = None) -> dict[str, tuple[str, str | None]]:
        """Launch `names`, each trying every zone of a type before the next type (`last`, an
        (instance type, zone or subnet) where they could not run, after every other); the (instance
        type, zone or subnet) each landed on."""
        if not names:
            return {}
        self.gpus_per_vm()  # types with different GPU counts are refused before any VM bills
        s = self.settings
        key = self.ec2.ensure_key_pair(s.key_pair, self.public_key())
        subnet = s.subnets[0] if s.subnets else None
        group = self.ec2.ensure_security_group(s.security_group, cidr=s.ssh_cidr, port=s.ssh_port, subnet=subnet)
        text = user_data(self._shell_script())
        behavior = "terminate" if self.idle_action == "delete" else "stop"
        nonce = uuid.uuid4().hex[:12]
        candidates = [(t, p) for t in s.instance_types for p in s.placements()]
        if last is not None:
            candidates = [c for c in candidates if c != last] + [c for c in candidates if c == last]

        def one(n: str, where: tuple[str, str | None], attempt: int) -> str:
            itype, place_ = where
            launch = Launch(n, itype, place_, attempt)
            params = run_request(s, launch, cluster=self.cluster_name, user_data_text=text, group_id=group,
                                 key_name=key, shutdown_behavior=behavior,
                                 token=client_token(self.cluster_name, launch, nonce))
            return self.ec2.run(params, doing=f"launching {n} ({itype} in {place_ or 'any zone'})")

        def full(where: tuple[str, str | None], results: dict[str, Any]) -> None:
            logger.warning("%s in %s has no capacity for %d VM(s) (%s); trying the next zone or type", where[0],
                           where[1] or "any zone", len(results), first_failure(results))

        out = place(names, candidates, one, fan_out=self._fan_out, on_full=full, log=logger,
                    landed=lambda where: f"on {where[0]} in {where[1] or 'any zone'}")
        raise_unplaced(out, verb="launch", made="launched", no_room=lambda done: (
            f"no capacity for {', '.join(s.instance_types)} in any of "
            f"{', '.join(p or 'any zone' for p in s.placements())} for {', '.join(sorted(out.pending))}{done}; "
            f"add zones or instance types to [aws], raise [aws] max_price, or retry later"))
        return out.placed

    def _booted(self, names: Sequence[str]) -> list[Instance]:
        raw = self.ec2.wait_settled(names, settled=(Status.RUNNING, Status.TERMINATED),
                                    timeout_s=self.timing.boot_timeout_s, what="running")
        return [self._to_instance(raw[n]) for n in names]

    def _known_hosts_lines(self, name: str, raw: dict[str, Any]) -> list[str]:
        address = address_of(raw, public=self.settings.public_ip)
        if not address:
            raise ProvisionError(f"{name} has no {'public' if self.settings.public_ip else 'private'} address "
                                 f"yet: run `fab heal`")
        host = host_pattern(address, self.settings.ssh_port)
        lines = []
        for key_type, value in self.ec2.console_host_keys(name, raw["InstanceId"]):
            if not KEY_TYPE.match(key_type) or not KEY_BASE64.match(value):
                raise ProvisionError(f"{name} printed a malformed host key {key_type!r}: refusing it")
            lines.append(f"{host} {key_type} {value}")
        return lines

    def _to_instance(self, raw: dict[str, Any]) -> Instance:
        return Instance(name=name_of(raw), address=address_of(raw, public=self.settings.public_ip),
                        port=self.settings.ssh_port, status=status_of(raw), zone=zone_of(raw),
                        preempted=interrupted(raw))

    def _shell_script(self) -> str:
        """The user-data's shell part: the spot notice watch, then boot.sh, with its unprovisioned guard."""
        script = _text(self._boot_script, what="boot script")
        if self.unprovisioned_stop_s is not None:
            first, _, rest = script.partition("\n")
            shebang, body = (first, rest) if first.startswith("#!") else ("#!/bin/sh", script)
            script = (f"{shebang}\n# spotfan: stop unless `fab up` provisions this VM in time (see boot.sh)\n"
                      f"SPOTFAN_UNPROVISIONED_S={int(self.unprovisioned_stop_s)}\n"
                      f"SPOTFAN_UNPROVISIONED_STOP={shlex.quote(self.self_stop_command)}\n"
                      f"export SPOTFAN_UNPROVISIONED_S SPOTFAN_UNPROVISIONED_STOP\n{body}")
        return shell_script(script, user=self.ssh_user, spot_notice=_text(self._spot_notice, what="spot notice watch"),
                            imds_url=self.settings.imds_url)

    def public_key(self) -> str:
        """The laptop's public key, as the key pair gets it."""
        text = _text(self._ssh_public_key, what="ssh public key") if isinstance(self._ssh_public_key, Path) \
            else self._ssh_public_key
        fields = text.strip().split()
        if len(fields) < 2 or not KEY_TYPE.match(fields[0]) or not KEY_BASE64.match(fields[1]):
            raise ConfigError(f"{self._ssh_public_key}: not an OpenSSH public key (\"ssh-ed25519 AAAA... comment\")")
        return " ".join(fields[:2])

    def _where(self, raw: dict[str, Any]) -> tuple[str, str | None]:
        """An instance's type and place as [aws] names places: its subnet, zone, or None (EC2 chose)."""
        s = self.settings
        return str(raw["InstanceType"]), raw.get("SubnetId") if s.subnets else zone_of(raw) if s.zones else None

    def _fan_out(self, items: Sequence[str], fn: Any) -> dict[str, Any]:
        return fan_out(items, fn, key=str, max_parallel=MAX_PARALLEL_CALLS)


def _text(value: str | Traversable | Path, *, what: str) -> str:
    if isinstance(value, str):
        return value
    try:
        return value.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read the {what} from {value}: {e}") from e


def _check_names(names: Sequence[str]) -> None:
    bad = [n for n in names if not _VM_NAME.match(n)]
    if bad:
        raise ConfigError(f"invalid VM name(s) {', '.join(map(repr, bad))}: lowercase letters, digits and '-', "
                          f"starting with a letter")
