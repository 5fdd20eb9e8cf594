"""IAM's projects.serviceAccounts (REST v1, iam.googleapis.com) for tests/fakes/gce.py, as the API reference has it:

- create: POST /v1/projects/P/serviceAccounts {"accountId": ID, "serviceAccount": {"displayName", "description"}}
  -> the account, email ID@P.iam.gserviceaccount.com; an ID in use -> 409 ALREADY_EXISTS ("Service account ID
  already exists within project projects/P."). IDs are 6-30 characters, [a-z][a-z0-9-]*[a-z0-9] (400 otherwise).
- get / delete: /v1/projects/P/serviceAccounts/EMAIL -> 404 NOT_FOUND when there is none.
- list: GET /v1/projects/P/serviceAccounts?pageSize=&pageToken= -> {"accounts": [...], "nextPageToken"}; the page
  size is at most 100.
"""

from __future__ import annotations

import itertools
import re
from typing import Any

ACCOUNT_ID_RE = re.compile(r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$")
MAX_PAGE = 100


class IamError(Exception):
    def __init__(self, code: int, status: str, message: str):
        super().__init__(message)
        self.code, self.status, self.message = code, status, message

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message, "status": self.status}}


class ServiceAccounts:
    def __init__(self) -> None:
        self.accounts: dict[str, dict[str, dict]] = {}  # project -> email -> account
        self._ids = itertools.count(100000000000000000000)

    def create(self, project: str, body: dict) -> dict:
        account_id = body.get("accountId", "")
        if not ACCOUNT_ID_RE.match(account_id):
            raise IamError(400, "INVALID_ARGUMENT", f"Invalid account ID {account_id!r}")
        email = f"{account_id}@{project}.iam.gserviceaccount.com"
        accounts = self.accounts.setdefault(project, {})
        if email in accounts:
            raise IamError(409, "ALREADY_EXISTS",
                           f"Service account {account_id} already exists within project projects/{project}.")
        extra = body.get("serviceAccount", {})
        unique = str(next(self._ids))
        account = {"name": f"projects/{project}/serviceAccounts/{email}", "projectId": project, "uniqueId": unique,
                   "email": email, "displayName": extra.get("displayName", ""),
                   "description": extra.get("description", ""), "oauth2ClientId": unique, "etag": "MDEwMjE5MjA="}
        accounts[email] = account
        return dict(account)

    def get(self, project: str, email: str) -> dict:
        account = self.accounts.get(project, {}).get(email)
        if account is None:
            raise IamError(404, "NOT_FOUND", f"Unknown service account projects/{project}/serviceAccounts/{email}")
        return dict(account)

    def delete(self, project: str, email: str) -> dict:
        self.get(project, email)
        del self.accounts[project][email]
        return {}

    def list(self, project: str, query: dict[str, str]) -> dict:
        size = int(query.get("pageSize") or MAX_PAGE)
        if not 0 < size <= MAX_PAGE:
            raise IamError(400, "INVALID_ARGUMENT", f"pageSize {size} is out of range")
        items = sorted(self.accounts.get(project, {}).values(), key=lambda a: a["email"])
        start = int(query.get("pageToken") or 0)
        out: dict[str, Any] = {"accounts": items[start:start + size]}
        if start + size < len(items):
            out["nextPageToken"] = str(start + size)
        return out

    def route(self, method: str, parts: list[str], query: dict[str, str], body: dict) -> dict:
        """parts after /v1/: ["projects", P, "serviceAccounts", (EMAIL)]."""
        if len(parts) < 3 or parts[0] != "projects" or parts[2] != "serviceAccounts":
            raise IamError(404, "NOT_FOUND", f"Unknown path /v1/{'/'.join(parts)}")
        project = parts[1]
        if len(parts) == 3 and method == "POST":
            return self.create(project, body)
        if len(parts) == 3 and method == "GET":
            return self.list(project, query)
        if len(parts) == 4 and method == "GET":
            return self.get(project, parts[3])
        if len(parts) == 4 and method == "DELETE":
            return self.delete(project, parts[3])
        raise IamError(400, "INVALID_ARGUMENT", f"Unsupported {method} /v1/{'/'.join(parts)}")
