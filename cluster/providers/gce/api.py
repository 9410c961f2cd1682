"""The adaptor for google-cloud-compute: the one module that imports it, builds its clients and
translates its exceptions.

The SDK is imported on first use, with an install hint when it is missing, so that the
GCE provider's settings validate (and `fab` runs the lab) without it. Every API call of
the provider runs inside `errors(doing)`, which turns the SDK's and google-auth's
exceptions into the cluster's tree in one place, with a message naming the fix:
`Gone` (404) and `Exists` (409) are ProvisionErrors a caller may accept.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cluster.errors import ProvisionError, QuotaError, StockoutError

if TYPE_CHECKING:
    from google.cloud import compute_v1

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "the GCE provider needs google-cloud-compute: run `pip install 'spotfan[gce]'` "
    "(or `pip install google-cloud-compute`)"
)
CREDENTIALS_HINT = (
    "run `gcloud auth application-default login`, or set GOOGLE_APPLICATION_CREDENTIALS "
    "to a service account key file"
)

# Operation error codes (operation.error.errors[].code) that mean "this zone is full".
STOCKOUT_CODES = ("ZONE_RESOURCE_POOL_EXHAUSTED", "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS")
QUOTA_CODES = ("QUOTA_EXCEEDED",)


class Gone(ProvisionError):
    """The API said 404: the instance, disk or operation does not exist (any more)."""


class Exists(ProvisionError):
    """The API said 409: a resource of that name exists already."""


def compute() -> Any:
    """The `google.cloud.compute_v1` module, imported on first use."""
    try:
        from google.cloud import compute_v1
    except ImportError as e:
        raise ProvisionError(INSTALL_HINT) from e
    return compute_v1


@dataclass(frozen=True)
class GceClients:
    """The Compute API clients the provider uses, sharing credentials and endpoint."""

    instances: "compute_v1.InstancesClient"  # instances.* and getGuestAttributes
    zone_operations: "compute_v1.ZoneOperationsClient"  # waits on zonal operations
    disks: "compute_v1.DisksClient"  # whether a head's kept data disk exists, to attach it again
    accelerator_types: "compute_v1.AcceleratorTypesClient"  # which GPU types a zone offers


def make_clients(*, project: str, api_endpoint: str | None) -> GceClients:
    """Build clients from Application Default Credentials, or for a plain-http endpoint.

    A plain `http://` endpoint (a local emulator) gets anonymous credentials, so no real
    token is ever sent over an unencrypted connection; any other endpoint (the default
    or e.g. a Private Service Connect `https://` one) uses Application Default Credentials.
    The operations client is built here with the same options because the one the SDK
    builds for `ExtendedOperation` polling ignores `api_endpoint`.
    """
    compute_v1 = compute()
    options: dict[str, str] = {}
    if api_endpoint:
        options["api_endpoint"] = api_endpoint
    if api_endpoint and api_endpoint.startswith("http://"):
        from google.auth.credentials import AnonymousCredentials

        credentials: Any = AnonymousCredentials()
    else:
        credentials = _default_credentials(project)
    kwargs = {"credentials": credentials, "transport": "rest", "client_options": options}
    return GceClients(
        instances=compute_v1.InstancesClient(**kwargs),
        zone_operations=compute_v1.ZoneOperationsClient(**kwargs),
        disks=compute_v1.DisksClient(**kwargs),
        accelerator_types=compute_v1.AcceleratorTypesClient(**kwargs),
    )


def _default_credentials(project: str) -> Any:
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    try:
        credentials, adc_project = google.auth.default(
            scopes=["https://www.googleapis.com/auth/cloud-platform"]
        )
    except DefaultCredentialsError as e:
        raise ProvisionError(f"no Google Cloud credentials found ({e}): {CREDENTIALS_HINT}") from e
    if adc_project and adc_project != project:
        logger.debug("ADC default project %s differs from [gce].project %s", adc_project, project)
    return credentials


# --- errors ----------------------------------------------------------------------------


@dataclass(frozen=True)
class OperationFailure:
    """What a failed Compute operation said, flattened from `operation.error.errors[]`."""

    codes: tuple[str, ...]  # e.g. ("ZONE_RESOURCE_POOL_EXHAUSTED",)
    message: str  # all error messages joined
    quota: str | None  # the quota's name when a quota was exceeded, e.g. "CPUS"

    @property
    def is_stockout(self) -> bool:
        # "HTTP_503": an operation that failed with only `httpErrorStatusCode` 503.
        return any(c.startswith(STOCKOUT_CODES) or c == "HTTP_503" for c in self.codes)

    @property
    def is_quota(self) -> bool:
        return any(c in QUOTA_CODES for c in self.codes)


def operation_failure(operation: Any) -> OperationFailure | None:
    """The error an Operation (plain or `ExtendedOperation`) carries, or None if it succeeded.

    `ExtendedOperation.result()` raises only when the operation carries both an HTTP
    status and message, so a finished operation is always inspected here instead.
    """
    errors = list(operation.error.errors)  # an empty Error when the field is unset
    http_code = getattr(operation, "http_error_status_code", 0)
    http_message = getattr(operation, "http_error_message", "")
    if not errors and not http_code:
        return None
    codes = tuple(e.code for e in errors) or (f"HTTP_{http_code}",)
    message = "; ".join(e.message for e in errors) or http_message
    return OperationFailure(codes=codes, message=message, quota=_quota_name(errors, message))


def _quota_name(errors: list[Any], message: str) -> str | None:
    match = re.search(r"Quota '([^']+)'", message)  # "Quota 'CPUS' exceeded.  Limit: 8.0 ..."
    if match:
        return match.group(1)
    for err in errors:
        for detail in err.error_details:
            if "quota_info" in detail:
                return detail.quota_info.limit_name or detail.quota_info.metric_name or None
    return None


@contextmanager
def errors(doing: str, *, project: str) -> Iterator[None]:
    """Run API calls, turning whatever the SDK raises into our tree (`translate`)."""
    try:
        yield
    except ProvisionError:
        raise
    except Exception as e:
        raise translate(e, project=project, doing=doing) from e


def translate(e: Exception, *, project: str, doing: str) -> ProvisionError:
    """Turn a google.api_core / google.auth exception into our tree, naming the fix."""
    from google.api_core import exceptions as gexc
    from google.auth import exceptions as auth_exc

    if isinstance(e, gexc.ServiceUnavailable):
        return StockoutError(f"{doing}: 503 service unavailable ({e})")
    if isinstance(e, (auth_exc.DefaultCredentialsError, auth_exc.RefreshError)):
        return ProvisionError(f"{doing}: credentials are missing or expired ({e}): {CREDENTIALS_HINT}")
    if not isinstance(e, gexc.GoogleAPICallError):
        return ProvisionError(f"{doing}: {e}")
    # api_core prefixes "POST https://...: "; the URL says nothing the rest does not.
    message = re.sub(r"^[A-Z]+ \S+: ", "", e.message or str(e))
    reasons = {getattr(e, "reason", None)} | {
        err.get("reason") for err in (e.errors or []) if isinstance(err, dict)
    }
    if isinstance(e, gexc.Unauthorized):
        return ProvisionError(f"{doing}: the credentials were rejected ({message}): {CREDENTIALS_HINT}")
    if "accessNotConfigured" in reasons or "SERVICE_DISABLED" in reasons or "has not been used in project" in message:
        return ProvisionError(
            f"{doing}: the Compute Engine API is not enabled in project {project}: run "
            f"`gcloud services enable compute.googleapis.com --project {project}` and retry "
            f"in a minute ({message})"
        )
    if "quotaExceeded" in reasons or "QUOTA_EXCEEDED" in message:
        quota = _quota_name([], message) or "unknown"
        return QuotaError(_quota_text(quota, message, project))
    if "acceleratorType" in message or "ccelerator type" in message:
        # The zone does not offer that GPU (now): like a full zone, the next one may.
        return StockoutError(f"{doing}: accelerator not available in this zone ({message})")
    if "Unknown zone" in message:
        return ProvisionError(
            f"{doing}: {message} Check [gce].zones: `gcloud compute zones list` shows the "
            f"valid names (a zone looks like us-central1-a, a region like us-central1)."
        )
    if "images/" in message and ("not found" in message or "cannot be found" in message):
        return ProvisionError(
            f"{doing}: the boot image does not exist or is not readable ({message}). Check "
            f"[gce].image, and `gcloud compute images list --project {project} --no-standard-images`; "
            f"docs/gce.md (step 3) shows how to prepare the image."
        )
    if "machineTypes" in message or "machine type" in message.lower():
        return ProvisionError(
            f"{doing}: unknown machine type ({message}): `gcloud compute machine-types list "
            f"--zones ZONE` lists what a zone offers"
        )
    if isinstance(e, gexc.NotFound):
        return Gone(f"{doing}: not found ({message})")
    if isinstance(e, gexc.Conflict):
        return Exists(f"{doing}: already exists ({message})")
    if isinstance(e, gexc.Forbidden):
        return ProvisionError(
            f"{doing}: permission denied ({message}): the account needs "
            f"roles/compute.instanceAdmin.v1 on project {project} (and "
            f"roles/iam.serviceAccountUser if [gce].service_account is set)"
        )
    return ProvisionError(f"{doing}: {type(e).__name__}: {message}")


def _quota_text(quota: str, message: str, project: str) -> str:
    return (
        f"quota {quota} exceeded in project {project} ({message}): ask for more at "
        f"https://console.cloud.google.com/iam-admin/quotas?project={project} "
        f"or create fewer or smaller workers"
    )


def quota_error(failure: OperationFailure, *, project: str) -> QuotaError:
    return QuotaError(_quota_text(failure.quota or "unknown", failure.message, project))
