"""Earth Engine credentials, found the way Google's own libraries find them, without a key file where none is needed.

In order: the file in GOOGLE_APPLICATION_CREDENTIALS (a service-account key, an authorized-user file, an
`external_account` workload identity federation file from EKS or Azure, an impersonated service account); the
token `earthengine authenticate` stored; Application Default Credentials through `google.auth.default`: gcloud's
file, then the metadata server of GCE, GKE (Workload Identity) or Cloud Run.

Google-auth no longer checks the URLs a credentials file names, and an `external_account` file sends the
workload's own identity token to its `token_url`: so every Google-side URL in a file is checked here before
google-auth sees it: https on googleapis.com, or this machine's loopback (a token broker beside the workload).
Nothing here reads or prints a secret.
"""

from __future__ import annotations

import ipaddress
import json
import os
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from geosoc.errors import CredentialsError, NotFoundError

ENV_PROJECT = "GEOSOC_EE_PROJECT"
ENV_KEY_FILE = "GOOGLE_APPLICATION_CREDENTIALS"
# What Earth Engine needs, no more: its own scope and cloud-platform (projects, service usage).
SCOPES = ("https://www.googleapis.com/auth/earthengine", "https://www.googleapis.com/auth/cloud-platform")
FILE_TYPES = ("service_account", "authorized_user", "external_account", "external_account_authorized_user",
              "impersonated_service_account")
# The fields of each file type that google-auth sends a token or a secret to.
GOOGLE_SIDE_URLS = ("token_url", "token_info_url", "revoke_url", "service_account_impersonation_url")
DEFAULT_METADATA_HOST = "169.254.169.254"


def find_credentials() -> tuple[Any, str | None]:
    """Credentials scoped for Earth Engine and the project they name, if any (GEOSOC_EE_PROJECT overrides it)."""
    from google.auth.credentials import with_scopes_if_required

    key_file = os.environ.get(ENV_KEY_FILE)
    if key_file:
        credentials, project = credentials_from_file(Path(key_file), ENV_KEY_FILE)
    else:
        found = _earthengine_token() or _application_default()
        if found is None:
            raise CredentialsError(_nothing_found())
        credentials, project = found
    return with_scopes_if_required(credentials, list(SCOPES)), project


def credentials_from_file(path: Path, named_by: str) -> tuple[Any, str | None]:
    """A credentials file through google-auth's own loader, once its type and URLs have been checked.

    Loaded without scopes, which are added afterwards: given scopes, google-auth would already exchange an
    `external_account` token to look up the project, a round trip that GEOSOC_EE_PROJECT makes unnecessary."""
    import google.auth
    from google.auth.exceptions import GoogleAuthError

    if not path.is_file():
        raise NotFoundError(f"{named_by} points to {path}, which is not a file")
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CredentialsError(f"{path} ({named_by}) is not a usable Google credentials file: "
                               f"{type(err).__name__}") from err
    _check_file(info, path, named_by)
    try:
        with warnings.catch_warnings():  # its warning asks callers to validate the file, as done just above
            warnings.filterwarnings("ignore", "The load_credentials_from_file method is deprecated", DeprecationWarning)
            return google.auth.load_credentials_from_file(str(path))
    except (GoogleAuthError, ValueError, KeyError, TypeError) as err:  # the message may quote the file: not shown
        raise CredentialsError(f"{path} ({named_by}) is not a usable Google credentials file: "
                               f"{type(err).__name__}") from err


def _check_file(info: Any, path: Path, named_by: str) -> None:
    """Refuse a file of an unknown type, or one that would send a token anywhere but Google or this machine."""
    kind = info.get("type") if isinstance(info, dict) else None
    if kind not in FILE_TYPES:
        raise CredentialsError(f"{path} ({named_by}) has credential type {kind!r}; expected one of "
                               f"{', '.join(FILE_TYPES)}")
    sections = [info]
    if isinstance(info.get("source_credentials"), dict):  # an impersonated account names its source's URLs too
        sections.append(info["source_credentials"])
    for section in sections:
        for name in GOOGLE_SIDE_URLS:
            url = section.get(name)
            if url is not None and not _google_or_loopback(url):
                raise CredentialsError(
                    f"{path} ({named_by}): {name} {_host(url)!r} is neither a Google endpoint (https://…"
                    ".googleapis.com) nor this machine; refusing to send a token there"
                )


def _host(url: Any) -> str:
    try:
        return urlsplit(str(url)).hostname or str(url)
    except ValueError:
        return str(url)


def _google_or_loopback(url: Any) -> bool:
    if not isinstance(url, str):
        return False
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError:
        return False
    if parts.scheme == "https" and (host == "googleapis.com" or host.endswith(".googleapis.com")):
        return True
    if parts.scheme not in ("http", "https"):
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _earthengine_token() -> tuple[Any, str | None] | None:
    """The refresh token `earthengine authenticate` stored, with the project it was made for."""
    import ee
    from google.oauth2.credentials import Credentials

    try:
        arguments = ee.oauth.get_credentials_arguments()
    except (OSError, ValueError):
        return None
    if not arguments.get("refresh_token"):
        return None
    return Credentials(None, **arguments), arguments.get("quota_project_id")


def _gcloud_file() -> Path:
    from google.auth import _cloud_sdk

    return Path(_cloud_sdk.get_application_default_credentials_path())


def _application_default() -> tuple[Any, str | None] | None:
    """`google.auth.default()`: gcloud's file (checked like ours first), then the metadata server."""
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    gcloud = _gcloud_file()
    if gcloud.is_file():
        return credentials_from_file(gcloud, "gcloud's application default credentials")
    try:
        return google.auth.default()
    except DefaultCredentialsError:
        return None


def _nothing_found() -> str:
    import ee

    metadata = os.environ.get("GCE_METADATA_IP") or os.environ.get("GCE_METADATA_HOST") or DEFAULT_METADATA_HOST
    return (
        "no Earth Engine credentials; tried: "
        f"{ENV_KEY_FILE} (not set); "
        f"the `earthengine authenticate` token ({ee.oauth.get_credentials_path()}: none); "
        f"gcloud's application default credentials ({_gcloud_file()}: none); "
        f"the metadata server of GCE/GKE/Cloud Run ({metadata}: no answer). "
        "On GKE use Workload Identity; elsewhere run `earthengine authenticate`, or set "
        f"{ENV_KEY_FILE} to a service-account key or workload identity federation file; and set {ENV_PROJECT}"
    )
