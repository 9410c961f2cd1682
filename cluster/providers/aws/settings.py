"""The `[aws]` table of cluster.toml, read by cluster.schema as every table is, with [cluster]
values as its defaults."""
from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster import schema
from cluster.errors import ConfigError
from cluster.providers.base import TableContext
from cluster.providers.head_vm import head_vm_problems

INTERRUPTIONS = ("stop", "terminate")  # what a spot interruption does to a worker
DEFAULT_IMDS_URL = "http://169.254.169.254"  # the instance metadata service, seen from inside a VM
_REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-[0-9]$")
_ZONE = re.compile(r"^[a-z]{2}(-[a-z]+)+-[0-9][a-z]$")
_AMI = re.compile(r"^ami-[0-9a-f]{8,17}$")
_SUBNET = re.compile(r"^subnet-[0-9a-f]{8,17}$")
_NAME = re.compile(r"^[A-Za-z0-9 ._:/()#,@\[\]+=&;{}!$*-]{1,255}$")  # EC2 group and key pair names


@dataclass(frozen=True)
class InstancePrice:
    """What one instance of a type costs per hour, in the currency the user wrote down."""

    on_demand: float  # on-demand price per hour
    spot: float | None = None  # spot price per hour; None if unknown


@dataclass(frozen=True)
class HeadSettings:
    """The optional `[aws.head]` table: an on-demand (never spot) head instance with an EBS data volume."""

    zone: str | None  # the head's and its volume's availability zone; None: the zone of `subnet`
    subnet: str | None = None  # the head's subnet; None: the zone's default subnet
    instance_type: str = "m6i.large"  # the head serves SFTP only: network, not CPU
    data_volume_gb: int = 100  # the EBS volume that holds the share, kept when the instance goes
    data_volume_type: str = "gp3"
    image: str = ""  # a Debian-like AMI with sshd (no spotfan install needed); default [aws] image
    boot_disk_gb: int = 10  # the head's root volume; the data lives on the data volume


@dataclass(frozen=True)
class AwsSettings:
    """Everything the AWS provider needs from cluster.toml's `[aws]` table."""

    image: str  # the worker AMI, "ami-..." (in `region`)
    instance_types: tuple[str, ...]  # tried in order, after every zone of the one before is out of capacity
    ssh_cidr: str  # the only source SSH is let in from, e.g. "203.0.113.7/32"; never 0.0.0.0/0 by default
    region: str | None = None  # None: the boto3 chain's (AWS_DEFAULT_REGION, the profile's region)
    profile: str | None = None  # a profile of ~/.aws/config; None: the boto3 default chain
    zones: tuple[str, ...] = ()  # availability zones tried in order (default subnets); () = EC2 picks
    subnets: tuple[str, ...] = ()  # subnet ids tried in order, instead of zones
    spot: bool = True  # spot instances (InstanceMarketOptions); False: on-demand
    interruption: str = "stop"  # "stop" (a persistent request; heal starts it) or "terminate" (heal recreates)
    max_price: str | None = None  # the highest spot price per hour; None: the on-demand price
    security_group: str = ""  # the group's name, created (or reused) in the VPC; "" = spotfan-CLUSTER
    key_pair: str = ""  # the key pair's name, imported from the laptop key (or reused); "" = spotfan-CLUSTER
    disk_size_gb: int = 20  # the root volume
    volume_type: str = "gp3"
    public_ip: bool = True  # give each worker a public address (SSH goes to it); else its private one
    instance_profile: str | None = None  # an IAM instance profile name or ARN; None = no AWS credentials on VMs
    tags: Mapping[str, str] = field(default_factory=dict)  # extra tags on every instance
    ssh_port: int = 22  # where sshd listens on the AMI
    imds_url: str = DEFAULT_IMDS_URL  # where a worker asks for its spot interruption notice
    prices: Mapping[str, InstancePrice] = field(default_factory=dict)  # instance type -> price
    head: HeadSettings | None = None  # `[aws.head] create = true`; None = the head is an existing host

    def placements(self) -> tuple[str | None, ...]:
        """Where a VM may go, in order: its subnets, else its zones, else wherever EC2 chooses."""
        return self.subnets or self.zones or (None,)

    @property
    def market(self) -> str:
        return "spot" if self.spot else "on-demand"


def _region(value: str) -> str | None:
    return None if _REGION.match(value) else 'must be a region name like "us-east-1"'


def _zones(zones: list[str]) -> str | None:
    if not all(_ZONE.match(z) for z in zones):
        return 'must be availability zone names like "us-east-1a"'
    return "lists a zone twice" if len(set(zones)) != len(zones) else None


def _subnets(subnets: list[str]) -> str | None:
    if not all(_SUBNET.match(s) for s in subnets):
        return 'must be subnet ids like "subnet-0123456789abcdef0"'
    return "lists a subnet twice" if len(set(subnets)) != len(subnets) else None


def _zone(zone: str) -> str | None:
    return None if _ZONE.match(zone) else 'must be an availability zone name like "us-east-1a"'


def _subnet(subnet: str) -> str | None:
    return None if _SUBNET.match(subnet) else 'must be a subnet id like "subnet-0123456789abcdef0"'


def _type(name: str) -> str | None:
    return None if _types([name]) is None else 'must be an instance type like "m6i.large"'


def _types(types: list[str]) -> str | None:
    if not types or not all(re.match(r"^[a-z0-9-]+\.[a-z0-9-]+$", t) for t in types):
        return 'must be a non-empty list of instance types like ["c6i.xlarge", "c5.xlarge"]'
    return "lists a type twice" if len(set(types)) != len(types) else None


def _ami(value: str) -> str | None:
    return None if _AMI.match(value) else 'must be an AMI id like "ami-0123456789abcdef0" (docs/aws.md, step 2)'


def _cidr(value: str) -> str | None:
    try:
        ipaddress.ip_network(value, strict=True)
    except ValueError:
        return 'must be a network like "203.0.113.7/32" (your laptop\'s public address, `curl https://checkip.amazonaws.com`)'
    return None


def _name(value: str) -> str | None:
    return None if not value or _NAME.match(value) else "must be an EC2 name: at most 255 letters, digits and ._-:/()#,@[]+=&;{}!$*"


def _price(value: str) -> str | None:
    try:
        return None if float(value) > 0 else "must be a price above 0, as text, e.g. \"0.05\""
    except ValueError:
        return 'must be a price per hour as text, e.g. "0.05"'


def _url(url: str) -> str | None:
    return None if url.startswith(("http://", "https://")) else "must start with http:// or https://"


def _tags(tags: dict[str, Any]) -> str | None:
    bad = [k for k in tags if not k or len(k) > 128 or k.lower().startswith(("aws:", "spotfan-")) or k == "Name"]
    return (f"has {bad[0]!r}: tag keys are 1-128 characters; aws:*, spotfan-* and Name are set by spotfan"
            if bad else None)


PRICE_FIELDS: dict[str, schema.Field] = {
    "on_demand": schema.number(schema.REQUIRED, 0),  # on-demand price per hour
    "spot": schema.number(None, 0),  # spot price per hour
}
VOLUME_TYPES = ("gp3", "gp2", "io1", "io2", "st1", "sc1", "standard")
HEAD_FIELDS: dict[str, schema.Field] = {
    "create": schema.flag(schema.REQUIRED),
    "zone": schema.text(None, check=_zone),
    "subnet": schema.text(None, check=_subnet),
    "instance_type": schema.text("m6i.large", check=_type),
    "data_volume_gb": schema.whole(100, 1, 16384),
    "data_volume_type": schema.text("gp3", choices=VOLUME_TYPES),
    "image": schema.text(None, check=_ami),  # default: [aws] image
    "boot_disk_gb": schema.whole(10, 8, 16384),
}
AWS_FIELDS: dict[str, schema.Field] = {
    "region": schema.text(None, check=_region),
    "profile": schema.text(None),
    "image": schema.text(check=_ami),
    "instance_types": schema.strings(schema.REQUIRED, check=_types),
    "zones": schema.strings(check=_zones),
    "subnets": schema.strings(check=_subnets),
    "ssh_cidr": schema.text(check=_cidr),
    "interruption": schema.text("stop", choices=INTERRUPTIONS),
    "max_price": schema.text(None, check=_price),
    "security_group": schema.text("", check=_name),
    "key_pair": schema.text("", check=_name),
    "disk_size_gb": schema.whole(20, 8, 16384),
    "volume_type": schema.text("gp3", choices=VOLUME_TYPES),
    "public_ip": schema.flag(True),
    "instance_profile": schema.text(None),
    "tags": schema.mapping(schema.text(""), check=_tags),
    "ssh_port": schema.whole(22, 1, 65535),
    "imds_url": schema.text(DEFAULT_IMDS_URL, check=_url),
    "prices": schema.mapping(schema.table(PRICE_FIELDS)),  # instance type -> { on_demand, spot }
    "head": schema.table(HEAD_FIELDS),  # `create = true`: spotfan makes the head instance and its data volume
}


def from_mapping(d: Mapping[str, Any], *, file: Path | str, cluster_name: str, spot: bool) -> AwsSettings:
    """Validate a parsed `[aws]` table; every problem is reported with its key, in file order."""
    found = schema.problems({"aws": dict(d)}, {"aws": AWS_FIELDS})
    v = schema.values(d, AWS_FIELDS) if not found else {}
    if not found and v["zones"] and v["subnets"]:
        found.append(schema.Problem("aws", "subnets", "and zones are both set: a subnet lies in one zone; "
                                    "keep subnets (tried in order) or zones (their default subnets)"))
    if not found and v["max_price"] and not spot:
        found.append(schema.Problem("aws", "max_price", "is a spot price, but [cluster] spot = false"))
    head = v["head"] if not found and v["head"] is not None and v["head"]["create"] else None
    head_values = schema.values(head, HEAD_FIELDS) if head is not None else {}
    if head is not None and not (head_values["zone"] or head_values["subnet"] or v["zones"] or v["subnets"]):
        found.append(schema.Problem("aws.head", "zone", "is needed (its data volume lives in one zone): set [aws.head] "
                                    'zone = "us-east-1a" or subnet, or [aws] zones or subnets'))
    if head is not None and head_values["zone"] and head_values["subnet"]:
        found.append(schema.Problem("aws.head", "subnet", "and zone are both set: a subnet lies in one zone; keep one"))
    if found:
        raise schema.error(file, found)
    return AwsSettings(
        image=v["image"], instance_types=tuple(v["instance_types"]), ssh_cidr=v["ssh_cidr"],
        region=v["region"], profile=v["profile"], zones=tuple(v["zones"]), subnets=tuple(v["subnets"]),
        spot=spot, interruption=v["interruption"].lower(), max_price=v["max_price"],
        security_group=v["security_group"] or f"spotfan-{cluster_name}",
        key_pair=v["key_pair"] or f"spotfan-{cluster_name}",
        disk_size_gb=v["disk_size_gb"], volume_type=v["volume_type"].lower(), public_ip=v["public_ip"],
        instance_profile=v["instance_profile"], tags=dict(v["tags"]), ssh_port=v["ssh_port"],
        imds_url=v["imds_url"].rstrip("/"),
        prices={t: InstancePrice(on_demand=float(p["on_demand"]),
                                 spot=None if p.get("spot") is None else float(p["spot"]))
                for t, p in v["prices"].items()},
        head=None if head is None else _head(head_values, zones=tuple(v["zones"]), subnets=tuple(v["subnets"]),
                                             image=v["image"]),
    )


def _head(h: Mapping[str, Any], *, zones: tuple[str, ...], subnets: tuple[str, ...], image: str) -> HeadSettings:
    """`[aws.head]`, where it goes by default: its own zone or subnet, else the first of [aws]'s."""
    zone, subnet = h["zone"], h["subnet"]
    if not zone and not subnet:
        zone, subnet = (None, subnets[0]) if subnets else (zones[0], None)
    return HeadSettings(zone=zone, subnet=subnet, instance_type=h["instance_type"],
                        data_volume_gb=h["data_volume_gb"], data_volume_type=h["data_volume_type"].lower(),
                        image=h["image"] or image, boot_disk_gb=h["boot_disk_gb"])


def parse(table: Mapping[str, Any], ctx: TableContext) -> tuple[AwsSettings | None, list[schema.Problem]]:
    """The [aws] table of cluster.toml, with [cluster] image and zones as defaults; and what
    provider = "aws" needs of the other tables."""
    c = ctx.cluster
    if not table:
        return None, [schema.Problem("cluster", "provider", '= "aws" needs an [aws] table with at least '
                                     'image, instance_types and ssh_cidr (docs/cluster-toml.md has every field)')]
    table = dict(table)
    if c["image"]:
        table.setdefault("image", c["image"])
    if c["zones"] and "subnets" not in table:
        table.setdefault("zones", list(c["zones"]))
    try:
        settings = from_mapping(table, file=ctx.path, cluster_name=c["name"], spot=bool(c["spot"]))
    except ConfigError as e:
        return None, list(e.problems) or [schema.Problem("aws", None, str(e))]
    problems = head_vm_problems(ctx, table="aws.head") if settings.head is not None else []
    if ctx.share.headless:
        problems += _bucket_access_problems(ctx, settings)
    if str(c["idle_action"]).lower() == "delete" and settings.spot and settings.interruption == "stop":
        problems.append(schema.Problem(
            "cluster", "idle_action", '= "delete" with [aws] interruption = "stop": a persistent spot '
            "request launches a new instance when one terminates itself; set interruption = "
            '"terminate", or idle_action = "stop"'))
    return settings, problems


def _bucket_access_problems(ctx: TableContext, settings: AwsSettings) -> list[schema.Problem]:
    """An EC2 fleet on a bucket reaches it through its instance profile, never with copied keys."""
    if ctx.share.kind != "s3":
        return [schema.Problem("share", "kind", (
            f'= "{ctx.share.kind}" with provider = "aws": EC2 instances reach a bucket through their '
            'instance profile, which only S3 accepts: use kind = "s3" with url = "s3://BUCKET/PREFIX" '
            "(spotfan never copies storage keys to VMs)"))]
    if not settings.instance_profile:
        return [schema.Problem("aws", "instance_profile", (
            'is required with [share] kind = "s3": the VMs use the bucket through this instance profile; '
            "its role needs s3:ListBucket on the bucket and s3:GetObject, s3:PutObject, s3:DeleteObject "
            "on PREFIX/* (docs/objstore.md)"))]
    return []
