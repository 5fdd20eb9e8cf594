"""Who calls tests/fakes/gce.py and what they may do: service-account bearer tokens, instance IAM policies
(instances.getIamPolicy / setIamPolicy) and the permission check, as the Compute API and IAM document them.

- No `Authorization` header: the project's owner (the tests' controller, with anonymous credentials); allowed.
- `Bearer T` with a token the metadata server handed out (`issue(email, scopes)`, tests/fakes/metadata.py) is that
  service account with those scopes; an unknown token is 401 UNAUTHENTICATED.
- A Compute call needs the OAuth scope `.../auth/compute` or `.../auth/cloud-platform` (the API reference's
  "Authorization scopes" of instances.delete); without it, 403 "Request had insufficient authentication scopes."
- Then the method's permission (instances.delete: `compute.instances.delete`) on the resource, from a binding on the
  resource itself (its IAM policy) or on the project (`grant_project`), whose role includes it; else 403
  "Required 'compute.instances.delete' permission for 'projects/P/zones/Z/instances/N'", reason forbidden.
- setIamPolicy on an instance: each role must be one grantable on an instance (ROLE_PERMISSIONS), each
  `serviceAccount:` member must exist (400 otherwise), a stale etag is 409 ABORTED. A deleted instance's policy goes
  with it (it is the resource's); a new instance of the same name starts with an empty one.

ROLE_PERMISSIONS lists the Compute permissions of each role that the tests need (IAM's "roles and permissions for
Compute Engine"), not every permission a role holds.
"""

from __future__ import annotations

import base64
import itertools
import secrets
from typing import Any

ACCEPTED_SCOPES = ("https://www.googleapis.com/auth/compute", "https://www.googleapis.com/auth/cloud-platform")
_INSTANCE_ADMIN = {f"compute.instances.{verb}" for verb in (
    "delete", "get", "list", "start", "stop", "reset", "setLabels", "setMetadata", "setServiceAccount",
    "getIamPolicy", "setIamPolicy", "create", "attachDisk", "detachDisk")} | {
    f"compute.disks.{verb}" for verb in ("create", "delete", "get", "list", "use", "setLabels")}
ROLE_PERMISSIONS: dict[str, set[str]] = {  # roles that can be granted on an instance
    "roles/compute.instanceAdmin.v1": _INSTANCE_ADMIN,
    "roles/compute.instanceAdmin": _INSTANCE_ADMIN,
    "roles/compute.admin": _INSTANCE_ADMIN | {"compute.images.get", "compute.networks.get"},
    "roles/compute.viewer": {"compute.instances.get", "compute.instances.list", "compute.instances.getIamPolicy"},
    "roles/compute.osLogin": {"compute.instances.get", "compute.instances.list"},
}
PROJECT_ROLES = {**ROLE_PERMISSIONS, "roles/owner": _INSTANCE_ADMIN, "roles/editor": _INSTANCE_ADMIN - {
    "compute.instances.setIamPolicy"}}


class AuthError(Exception):
    def __init__(self, code: int, status: str, reason: str, message: str):
        super().__init__(message)
        self.code, self.status, self.reason, self.message = code, status, reason, message

    def body(self) -> dict:
        err = {"message": self.message, "domain": "global", "reason": self.reason}
        return {"error": {"code": self.code, "message": self.message, "errors": [err], "status": self.status}}


class Access:
    """Tokens, the IAM policies of instances (by instance id) and project bindings."""

    def __init__(self) -> None:
        self.tokens: dict[str, tuple[str, tuple[str, ...]]] = {}  # token -> (service account email, scopes)
        self.policies: dict[str, dict[str, Any]] = {}  # instance id -> {"bindings": [...], "etag": ...}
        self.project_bindings: dict[str, list[dict[str, Any]]] = {}
        self._etags = itertools.count(1)

    def issue(self, email: str, scopes: list[str] | tuple[str, ...]) -> str:
        token = "ya29.fake-" + secrets.token_urlsafe(24)
        self.tokens[token] = (email, tuple(scopes))
        return token

    def grant_project(self, project: str, role: str, member: str) -> None:
        self.project_bindings.setdefault(project, []).append({"role": role, "members": [member]})

    def caller(self, authorization: str) -> tuple[str, tuple[str, ...]] | None:
        """None for the owner (no header); (email, scopes) for a known token; 401 otherwise."""
        if not authorization:
            return None
        kind, _, token = authorization.partition(" ")
        if kind.lower() != "bearer" or token not in self.tokens:
            raise AuthError(401, "UNAUTHENTICATED", "authError", "Request had invalid authentication credentials. "
                            "Expected OAuth 2 access token, login cookie or other valid authentication credential.")
        return self.tokens[token]

    def authorize(self, authorization: str, permission: str, project: str, resource: str,
                  instance_id: str | None = None) -> None:
        """Raise the API's 401/403 unless the caller may do `permission` on `resource` (a path)."""
        who = self.caller(authorization)
        if who is None:
            return
        email, scopes = who
        if not set(scopes) & set(ACCEPTED_SCOPES):
            raise AuthError(403, "PERMISSION_DENIED", "insufficientPermissions",
                            "Request had insufficient authentication scopes.")
        member = f"serviceAccount:{email}"
        on_resource = self.policies.get(instance_id, {}).get("bindings", []) if instance_id else []
        on_project = self.project_bindings.get(project, [])
        for bindings, roles in ((on_project, PROJECT_ROLES), (on_resource, ROLE_PERMISSIONS)):
            if any(member in b["members"] and permission in roles.get(b["role"], set()) for b in bindings):
                return
        raise AuthError(403, "PERMISSION_DENIED", "forbidden", f"Required '{permission}' permission for '{resource}'")

    def policy(self, instance_id: str) -> dict[str, Any]:
        current = self.policies.setdefault(instance_id, {"version": 1, "bindings": [], "etag": self._etag()})
        return {"version": current["version"], "etag": current["etag"],
                "bindings": [{"role": b["role"], "members": list(b["members"])} for b in current["bindings"]]}

    def set_policy(self, instance_id: str, body: dict[str, Any], account_exists: Any) -> dict[str, Any]:
        """instances.setIamPolicy: body {"policy": {...}} (ZoneSetPolicyRequest)."""
        new = body.get("policy") or {"bindings": body.get("bindings", []), "etag": body.get("etag", "")}
        current = self.policy(instance_id)
        if new.get("etag") and new["etag"] != current["etag"]:
            raise AuthError(409, "ABORTED", "aborted", "There were concurrent policy changes. Please retry the whole "
                            "read-modify-write with exponential backoff.")
        bindings = []
        for binding in new.get("bindings", []):
            role = binding.get("role", "")
            if role not in ROLE_PERMISSIONS:
                raise AuthError(400, "INVALID_ARGUMENT", "badRequest",
                                f"Role {role} is not supported for this resource.")
            for member in binding.get("members", []):
                kind, _, email = member.partition(":")
                if kind == "serviceAccount" and not account_exists(email):
                    raise AuthError(400, "INVALID_ARGUMENT", "badRequest", f"Service account {email} does not exist.")
            bindings.append({"role": role, "members": list(binding.get("members", []))})
        self.policies[instance_id] = {"version": 1, "bindings": bindings, "etag": self._etag()}
        return self.policy(instance_id)

    def forget(self, instance_id: str) -> None:
        self.policies.pop(instance_id, None)

    def _etag(self) -> str:
        return base64.b64encode(f"etag-{next(self._etags)}".encode()).decode()
