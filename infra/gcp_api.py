"""How gpuforge reaches Google's APIs outside Pulumi (sweep, preflight, data, bake): one place for clients.

    GPUFORGE_GCP_ENDPOINT=http://127.0.0.1:8123   # Compute REST and IAM at a local endpoint (an emulator or fake);
                                                  # anonymous credentials. GCS follows STORAGE_EMULATOR_HOST.

Without it the clients use Google's endpoints and Application Default Credentials (`gcloud auth application-default
login`, or GOOGLE_APPLICATION_CREDENTIALS).
"""

from __future__ import annotations

import os
from typing import Any, Iterator

ENDPOINT_ENV = "GPUFORGE_GCP_ENDPOINT"
IAM_ROOT = "https://iam.googleapis.com"
IAM_PAGE = 100  # projects.serviceAccounts.list: pageSize at most 100 (IAM API reference)


def endpoint() -> str:
    return os.environ.get(ENDPOINT_ENV, "").rstrip("/")


def client_settings(client_options: Any = None, credentials: Any = None) -> tuple[Any, Any]:
    """(client_options, credentials) for compute_v1 clients: the caller's, else our endpoint setting, else Google's."""
    if client_options is None and endpoint():
        from google.api_core.client_options import ClientOptions
        from google.auth.credentials import AnonymousCredentials

        return ClientOptions(api_endpoint=endpoint()), credentials or AnonymousCredentials()
    return client_options, credentials


def compute_kwargs(client_options: Any = None, credentials: Any = None) -> dict[str, Any]:
    options, creds = client_settings(client_options, credentials)
    return {"transport": "rest", "client_options": options, "credentials": creds}


def api_root(client_options: Any) -> str:
    """The endpoint of `client_options` (the same host serves IAM in tests), else Google's IAM."""
    custom = getattr(client_options, "api_endpoint", None) or (
        client_options.get("api_endpoint") if isinstance(client_options, dict) else None)
    return (custom or IAM_ROOT).rstrip("/")


class ServiceAccountsApi:
    """IAM projects.serviceAccounts over REST (list, delete): what the sweep needs, no extra client library."""

    def __init__(self, client_options: Any = None, credentials: Any = None):
        options, creds = client_settings(client_options, credentials)
        self.root = api_root(options)
        if creds is None:
            import google.auth

            creds, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
        from google.auth.transport.requests import AuthorizedSession

        self.session = AuthorizedSession(creds)

    def _call(self, method: str, path: str, **params: Any) -> dict:
        from google.api_core import exceptions

        reply = self.session.request(method, f"{self.root}/v1/{path}", params=params or None, timeout=60)
        if reply.status_code >= 400:
            try:
                message = reply.json()["error"]["message"]
            except (ValueError, KeyError):
                message = reply.text[:300]
            raise exceptions.from_http_status(reply.status_code, message)
        return reply.json() if reply.content else {}

    def list(self, project: str) -> Iterator[dict]:
        token = ""
        while True:
            page = self._call("GET", f"projects/{project}/serviceAccounts", pageSize=IAM_PAGE,
                              **({"pageToken": token} if token else {}))
            yield from page.get("accounts", [])
            token = page.get("nextPageToken", "")
            if not token:
                return

    def delete(self, project: str, email: str) -> None:
        self._call("DELETE", f"projects/{project}/serviceAccounts/{email}")
