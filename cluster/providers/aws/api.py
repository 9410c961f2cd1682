"""The adaptor for boto3: the one module that imports it, builds the EC2 client and translates its errors.

boto3 is imported on first use, with an install hint when it is missing, so that the
[aws] table validates (and `fab` runs the lab or GCE) without it. Credentials come from
the standard boto3 chain (a profile, the environment, an instance role); the endpoint
from `AWS_ENDPOINT_URL` when set (boto3 reads it; tests point it at a local server).
Every call runs through `Ec2Api.call`, which retries throttling with bounded backoff and
turns a `ClientError` into the cluster's tree in one table: capacity errors are
StockoutErrors (the caller tries the next zone or type), quota errors QuotaErrors.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cluster.errors import ProvisionError, QuotaError, StockoutError

logger = logging.getLogger(__name__)

INSTALL_HINT = "the AWS provider needs boto3: run `pip install 'spotfan[aws]'` (or `pip install boto3`)"
CREDENTIALS_HINT = (
    "run `aws configure` (or `aws sso login --profile P` and set [aws] profile), or set "
    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
)
THROTTLE_ATTEMPTS = 6  # tries of one call that EC2 throttles (RequestLimitExceeded), the first included
THROTTLE_BASE_S = 0.5  # backoff before the second try; doubled each time, with full jitter ...
THROTTLE_MAX_S = 8.0  # ... up to this
API_TIMEOUT_S = 60.0  # one HTTP read

# Error codes that mean "not here, not now": the VM moves to the next zone, then type.
CAPACITY_CODES = frozenset({
    "InsufficientInstanceCapacity", "InsufficientCapacity", "InsufficientHostCapacity",
    "SpotMaxPriceTooLow", "MaxSpotInstanceCountExceeded", "Unavailable", "ServiceUnavailable",
    "InternalError", "InternalFailure",
})
THROTTLE_CODES = frozenset({"RequestLimitExceeded", "Throttling", "ThrottlingException", "RequestThrottled"})
QUOTA_CODES = frozenset({"VcpuLimitExceeded", "InstanceLimitExceeded", "ResourceLimitExceeded",
                         "VolumeLimitExceeded", "AddressLimitExceeded"})
GONE_CODES = frozenset({"InvalidInstanceID.NotFound", "InvalidGroup.NotFound", "InvalidKeyPair.NotFound",
                        "InvalidSpotInstanceRequestID.NotFound"})
CREDENTIAL_CODES = frozenset({"AuthFailure", "InvalidClientTokenId", "UnrecognizedClientException",
                              "SignatureDoesNotMatch", "ExpiredToken", "RequestExpired", "OptInRequired"})


class Gone(ProvisionError):
    """EC2 said the instance, group or key pair does not exist (any more)."""


class Exists(ProvisionError):
    """EC2 said a group or key pair of that name exists already."""


def boto3() -> Any:
    """The `boto3` module, imported on first use."""
    try:
        import boto3 as module
    except ImportError as e:
        raise ProvisionError(INSTALL_HINT) from e
    return module


@dataclass(frozen=True)
class ApiError:
    """What a failed call said: the EC2 error code, its message and the HTTP status."""

    code: str  # e.g. "InsufficientInstanceCapacity"
    message: str
    status: int  # HTTP status; 0 when the request never got an answer


class Ec2Api:
    """One region's EC2 client, made on first use; `call` is how every request is sent."""

    def __init__(self, *, region: str | None, profile: str | None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.region = region
        self.profile = profile
        self._sleep = sleep
        self._client: Any = None
        self._lock = threading.Lock()

    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = self._make()
            return self._client

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def _make(self) -> Any:
        b3 = boto3()
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ProfileNotFound

        try:
            session = b3.session.Session(profile_name=self.profile, region_name=self.region)
        except ProfileNotFound as e:
            raise ProvisionError(f"[aws] profile = {self.profile!r} is not in ~/.aws/config ({e}): "
                                 f"run `aws configure --profile {self.profile}` or fix the name") from e
        region = session.region_name
        if not region:
            raise ProvisionError("no AWS region: set [aws] region in cluster.toml (e.g. \"us-east-1\"), "
                                 "or AWS_DEFAULT_REGION, or a region in your ~/.aws/config profile")
        try:
            if session.get_credentials() is None:
                raise ProvisionError(f"no AWS credentials found: {CREDENTIALS_HINT}")
        except BotoCoreError as e:
            raise ProvisionError(f"the AWS credentials cannot be read ({e}): {CREDENTIALS_HINT}") from e
        # Retries are ours (`call`): one bound, and capacity errors move on instead of waiting.
        config = Config(retries={"total_max_attempts": 1, "mode": "standard"}, read_timeout=API_TIMEOUT_S,
                        connect_timeout=API_TIMEOUT_S, max_pool_connections=16)
        self.region = region
        return session.client("ec2", config=config)

    def call(self, operation: str, doing: str, **params: Any) -> Any:
        """`client.<operation>(**params)`, throttling retried (bounded), errors translated."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        for attempt in range(1, THROTTLE_ATTEMPTS + 1):
            try:
                return getattr(self.client(), operation)(**params)
            except ClientError as e:
                err = error_of(e)
                if err.code in THROTTLE_CODES and attempt < THROTTLE_ATTEMPTS:
                    wait = random.uniform(0, min(THROTTLE_MAX_S, THROTTLE_BASE_S * 2 ** (attempt - 1)))
                    logger.info("%s: throttled by EC2 (%s); try %d of %d in %.1f s", doing, err.code,
                                attempt + 1, THROTTLE_ATTEMPTS, wait)
                    self._sleep(wait)
                    continue
                raise translate(err, doing=doing, region=self.region) from e
            except NoCredentialsError as e:
                raise ProvisionError(f"{doing}: no AWS credentials found: {CREDENTIALS_HINT}") from e
            except BotoCoreError as e:
                raise ProvisionError(f"{doing}: {e}") from e
        raise AssertionError("unreachable: the last attempt returns or raises")


def error_of(e: Any) -> ApiError:
    """The code, message and status of a botocore ClientError."""
    body = e.response.get("Error", {})
    status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    return ApiError(code=str(body.get("Code", "")), message=str(body.get("Message", "")), status=status)


def translate(err: ApiError, *, doing: str, region: str | None) -> ProvisionError:
    """One EC2 error as our tree, with a message naming the fix."""
    what = f"{doing}: {err.code}: {err.message}"
    if err.code in THROTTLE_CODES:
        return ProvisionError(f"{what} (still throttled after {THROTTLE_ATTEMPTS} tries): wait a minute and "
                              f"run the command again, or ask for a higher API rate limit")
    if err.code in QUOTA_CODES:
        return QuotaError(f"{what}: ask for more at https://console.aws.amazon.com/servicequotas/home"
                          f"?region={region} (EC2, \"Running On-Demand/Spot ... instances\" vCPUs), or make "
                          f"fewer or smaller workers")
    if err.code in CAPACITY_CODES or err.status >= 500:
        return StockoutError(what)
    if err.code in CREDENTIAL_CODES:
        return ProvisionError(f"{what}: the AWS credentials were refused: {CREDENTIALS_HINT}")
    if err.code in ("UnauthorizedOperation", "AccessDenied", "AccessDeniedException"):
        return ProvisionError(f"{what}: the credentials may not do this: give them the IAM policy of "
                              f"docs/aws.md (ec2:RunInstances, ec2:CreateTags, ...)")
    if err.code.startswith("InvalidAMIID"):
        return ProvisionError(f"{what}: check [aws] image: `aws ec2 describe-images --image-ids IMAGE "
                              f"--region {region}` (an AMI belongs to one region)")
    if err.code == "InvalidInstanceType":
        return ProvisionError(f"{what}: check [aws] instance_types: `aws ec2 describe-instance-types "
                              f"--region {region}` lists the types of a region")
    if err.code.startswith("InvalidSubnetID") or err.code == "InvalidAvailabilityZone" or (
            err.code == "InvalidParameterValue" and "zone" in err.message.lower()):
        return ProvisionError(f"{what}: check [aws] zones/subnets: `aws ec2 describe-availability-zones "
                              f"--region {region}`")
    if err.code in GONE_CODES:
        return Gone(what)
    if err.code in ("InvalidGroup.Duplicate", "InvalidKeyPair.Duplicate"):
        return Exists(what)
    return ProvisionError(what)
