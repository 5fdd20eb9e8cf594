"""A local Compute Engine v1 REST endpoint (and the IAM service-account calls) for the real Google clients.

One stdlib HTTP server in a thread, state in dicts. It speaks enough of the API for the leftover sweep, the
preflight checks, image baking and the lifecycle tests' stand-in for `pulumi up`: instances (insert/get/list/
aggregatedList/delete/stop/start/setLabels/setServiceAccount/getIamPolicy/setIamPolicy), disks, firewalls, networks,
subnetworks, addresses, resourcePolicies, images (insert from a disk, get, list, getFromFamily, delete), machineTypes
and acceleratorTypes (per zone, from `offerings`), regions.get and projects.get with their quotas, zone/region/global
operations (get, wait), and IAM's projects.serviceAccounts (create/get/list/delete) under /v1/. Lists page with
maxResults/pageToken; `filter` follows the documented rules (tests/fakes/gce_filter.py: several expressions only in parentheses, the two forms not mixed).

    with FakeCompute(project="p") as gce:
        disks = compute_v1.DisksClient(**gce.client_kwargs())
        gce.seed("disks", "zones/us-central1-a", {"name": "d1", "labels": {"k": "v"}})
        assert gce.names("disks") == {"d1"}

Rules it applies, as the API does: a name in use is a 409 alreadyExists; deleting a disk that an instance uses, or a
network that a firewall, subnetwork or instance uses, or a resource policy an instance uses, fails with 400
resourceInUseByAnotherResource; setLabels needs the current labelFingerprint (else 412 conditionNotMet); an instance
insert is checked against the zone's offerings, gVNIC and compact-placement rules, and ends with
ZONE_RESOURCE_POOL_EXHAUSTED in a zone `exhaust()`ed or QUOTA_EXCEEDED past a GPU quota (tests/fakes/gce_rules.py).
A call without credentials is the project's owner's; one with a service account's bearer token (`access.issue`, what
tests/fakes/metadata.py hands a node) needs the Compute scope and the method's permission through a binding on the
instance or the project, else 403 as the API answers (tests/fakes/gce_auth.py); setServiceAccount needs the VM stopped.

Operations are DONE at once. With `pending_polls=N` they report RUNNING for N polls and their effect (create,
delete) lands only when they finish; a caller that does not wait sees the old state.

For image baking: an instance's boot disk can come from `initializeParams.sourceImage` (an image or
`.../images/family/F`, in any project; 404 when there is none); creating an image from a disk that a RUNNING instance
uses fails with 400 resourceInUseByAnotherResource unless `forceCreate` is set. `fail_next("image", "insert",
"message", leave=True)` makes the next such operation end with that error (and, with `leave`, leaves the resource
behind with status FAILED, like a half-made image).
"""

from __future__ import annotations

import itertools
import json
import re
import threading
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, unquote, urlparse

from tests.fakes.gce_auth import Access, AuthError
from tests.fakes.gce_filter import FilterError, field_value, matches  # noqa: F401 - field_value re-exported
from tests.fakes.gce_filter import parse_filter as _parse_filter
from tests.fakes.gce_iam import ServiceAccounts
from tests.fakes.gce_rules import (
    DEFAULT_OFFERINGS,
    GLOBAL_GPU_METRIC,
    InsertRefused,
    capacity_error,
    check_instance,
    gpu_demand,
    quota_error,
)

API_ROOT = "https://www.googleapis.com/compute/v1/"  # what real selfLinks start with
SCOPED = {"instances": "zones", "disks": "zones", "subnetworks": "regions", "addresses": "regions",
          "resourcePolicies": "regions", "firewalls": "global", "networks": "global", "images": "global"}
SINGULAR = {"instances": "instance", "disks": "disk", "subnetworks": "subnetwork", "addresses": "address",
            "resourcePolicies": "resourcePolicy", "firewalls": "firewall", "networks": "network",
            "images": "image"}
OFFERED = ("machineTypes", "acceleratorTypes")  # read-only per-zone collections, from `offerings`
SINGULAR_OFFERED = {"machineTypes": "machineType", "acceleratorTypes": "acceleratorType"}
MAX_RESULTS = 500  # the API's default and maximum page size for list calls
class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str):
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def body(self) -> dict:
        err = {"message": self.message, "domain": "global", "reason": self.reason}
        return {"error": {"code": self.code, "message": self.message, "errors": [err]}}


def parse_filter(text: str) -> list:
    """A list filter in one of the documented forms; anything else is the API's 400 invalid."""
    try:
        return _parse_filter(text)
    except FilterError:
        raise ApiError(400, "invalid", f"Invalid value for field 'filter': '{text}'. Invalid list filter expression.")


def last(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


class FakeCompute:
    """State: `store[collection][(project, scope)][name] -> resource dict` (scope `zones/Z`,
    `regions/R` or `global`); `operations[name]`; `requests` logs (method, path)."""

    def __init__(self, project: str = "fake-project", pending_polls: int = 0,
                 offerings: dict[str, dict[str, list[str]]] | None = None, default_network: bool = True):
        self.project = project
        self.pending_polls = pending_polls
        self.offerings = {z: {k: list(v) for k, v in o.items()} for z, o in (offerings or DEFAULT_OFFERINGS).items()}
        self.exhausted: set[tuple[str, str]] = set()  # (zone, machine type or "*")
        self.quotas: dict[tuple[str, str], float] = {}  # (project, region or "global") -> {metric: limit}
        self.iam = ServiceAccounts()
        self.access = Access()  # tokens, instance IAM policies, the permission check (tests/fakes/gce_auth.py)
        self.store: dict[str, dict[tuple[str, str], dict[str, dict]]] = {c: {} for c in SCOPED}
        self.operations: dict[str, dict] = {}
        self.requests: list[tuple[str, str]] = []
        self.inserted: list[tuple[str, dict]] = []  # (collection, body) of every insert asked for
        self.lock = threading.RLock()
        self._ids = itertools.count(1000)
        self._epoch = datetime.now(timezone.utc)
        self._commits: dict[str, Callable[[], None]] = {}
        self._pending: dict[str, int] = {}
        self._errors: dict[str, dict] = {}
        self.faults: dict[tuple[str, str], tuple[str, bool]] = {}
        self._httpd: ThreadingHTTPServer | None = None
        if default_network:  # a new project's auto-mode `default` network (org policies can remove it)
            self.seed("networks", "global", {"name": "default", "autoCreateSubnetworks": True,
                                             "description": "Default network for the project"})

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> "FakeCompute":
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def handle_any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                status, body = fake.dispatch(self.command, self.path, json.loads(raw) if raw else {},
                                             self.headers.get("Authorization", ""))
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=UTF-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = do_PATCH = handle_any

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True, name="fake-gce").start()
        return self

    def stop(self) -> None:
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "FakeCompute":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        assert self._httpd, "FakeCompute is not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    @property
    def client_options(self) -> Any:
        from google.api_core.client_options import ClientOptions

        return ClientOptions(api_endpoint=self.endpoint)

    @property
    def credentials(self) -> Any:
        from google.auth.credentials import AnonymousCredentials

        return AnonymousCredentials()

    def client_kwargs(self) -> dict:
        """Keyword arguments for any compute_v1 client: anonymous, REST, this endpoint."""
        return {"credentials": self.credentials, "transport": "rest", "client_options": self.client_options}

    # -- seeding and inspection -------------------------------------------------------------
    def seed(self, collection: str, scope: str, body: dict, project: str | None = None) -> dict:
        """Create a resource directly (no operation), with the same defaults as insert."""
        with self.lock:
            resource = self._build(collection, project or self.project, scope, dict(body))
            self._put(collection, project or self.project, scope, resource)
            return resource

    def get(self, collection: str, scope: str, name: str, project: str | None = None) -> dict | None:
        return self.store[collection].get((project or self.project, scope), {}).get(name)

    def names(self, collection: str, scope: str | None = None, project: str | None = None) -> set[str]:
        return {r["name"] for s, r in self.items(collection, project) if scope in (None, s)}

    def items(self, collection: str, project: str | None = None) -> list[tuple[str, dict]]:
        with self.lock:
            return [(scope, r) for (p, scope), rs in self.store[collection].items()
                    if p == (project or self.project) for r in rs.values()]

    def exhaust(self, zone: str, machine_type: str = "*") -> None:
        """From now on, inserting an instance of `machine_type` (any, with "*") in `zone` ends with
        ZONE_RESOURCE_POOL_EXHAUSTED, as when Google has no capacity there."""
        self.exhausted.add((zone, machine_type))

    def set_quota(self, metric: str, limit: float, region: str = "global", project: str | None = None) -> None:
        """A regional quota (NVIDIA_A100_GPUS in us-central1) or a project-wide one (GPUS_ALL_REGIONS)."""
        self.quotas[(project or self.project, region, metric)] = float(limit)

    def quota_usage(self, project: str, metric: str, region: str = "global") -> float:
        used = 0.0
        for scope, instance in self.items("instances", project):
            if region != "global" and not scope.startswith(f"zones/{region}-"):
                continue
            wanted, count = gpu_demand(instance)
            if wanted == metric or (metric == GLOBAL_GPU_METRIC and wanted):
                used += count
        return used

    def fail_next(self, kind: str, verb: str, message: str, leave: bool = False) -> None:
        """The next `verb` operation on a `kind` (singular: "image", "instance") ends with `message` as
        its error; with `leave` its resource is still created, with status FAILED."""
        self.faults[(kind, verb)] = (message, leave)

    def finish_operations(self) -> None:
        """Time passes: every pending operation ends, as GCE ends them whether or not anyone polls (a node that asked
        for its own deletion does not wait for it)."""
        with self.lock:
            for name in list(self.operations):
                self._finish(name)

    # -- routing ----------------------------------------------------------------------------
    def dispatch(self, method: str, path: str, body: dict, authorization: str = "") -> tuple[int, dict]:
        url = urlparse(path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.requests.append((method, url.path))
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        from tests.fakes.gce_iam import IamError

        try:
            with self.lock:
                if parts[:1] == ["v1"]:
                    if self.access.caller(authorization) is not None:
                        raise AuthError(403, "PERMISSION_DENIED", "forbidden", "Permission denied (the fake's IAM "
                                        "API answers the project's owner only)")
                    return 200, self.iam.route(method, parts[1:], query, body)
                return 200, self._route(method, parts, query, body, authorization)
        except (ApiError, IamError, AuthError) as exc:
            return exc.code, exc.body()

    def _route(self, method: str, parts: list[str], query: dict, body: dict, authorization: str = "") -> dict:
        if parts[:3] == ["compute", "v1", "projects"] and len(parts) == 4 and method == "GET":
            return self._project(parts[3])
        if parts[:3] == ["compute", "v1", "projects"] and len(parts) == 6 and parts[4] == "regions" and method == "GET":
            return self._region(parts[3], parts[5])
        if parts[:3] != ["compute", "v1", "projects"] or len(parts) < 6:
            raise ApiError(404, "notFound", f"Unknown path /{'/'.join(parts)}")
        project, rest = parts[3], parts[4:]
        if rest[0] == "aggregated" and rest[1] in OFFERED:
            return self._aggregated_offered(project, rest[1], query)
        if rest[0] == "zones" and len(rest) >= 3 and rest[2] in OFFERED:
            return self._offered(project, rest[1], rest[2], rest[3:], query)
        if rest[0] == "aggregated":
            return self._aggregated(project, rest[1], query)
        if rest[0] == "global":
            scope, rest = "global", rest[1:]
        elif rest[0] in ("zones", "regions") and len(rest) >= 3:
            scope, rest = f"{rest[0]}/{rest[1]}", rest[2:]
        else:
            raise ApiError(404, "notFound", f"Unknown scope {rest[0]}")
        collection, rest = rest[0], rest[1:]
        if authorization:
            self._authorize(authorization, method, project, scope, collection, rest)
        if collection == "operations":
            return self._operation(project, scope, rest)
        if collection not in SCOPED:
            raise ApiError(404, "notFound", f"Unknown collection {collection}")
        if collection == "images" and method == "GET" and rest[:1] == ["family"] and len(rest) == 2:
            return self._from_family(project, rest[1])
        if not rest and method == "GET":
            return self._list(collection, project, scope, query)
        if not rest and method == "POST":
            return self._insert(collection, project, scope, body, query)
        resource = self._find(collection, project, scope, rest[0])
        if len(rest) == 1 and method == "GET":
            return resource
        if collection == "instances" and rest[1:] == ["getIamPolicy"] and method == "GET":
            return self.access.policy(resource["id"])
        if collection == "instances" and rest[1:] == ["setIamPolicy"] and method == "POST":
            return self.access.set_policy(resource["id"], body, lambda email: any(
                email in accounts for accounts in self.iam.accounts.values()))
        if len(rest) == 1 and method == "DELETE":
            return self._delete(collection, project, scope, resource)
        if len(rest) == 2 and method == "POST":
            return self._action(collection, project, scope, resource, rest[1], body)
        raise ApiError(400, "badRequest", f"Unsupported {method} on {collection}")

    def _authorize(self, authorization: str, method: str, project: str, scope: str, collection: str,
                   rest: list[str]) -> None:
        """A service account's call (a bearer token) needs the method's permission (tests/fakes/gce_auth.py)."""
        if collection == "operations":
            kind = {"zones": "zoneOperations", "regions": "regionOperations"}.get(scope.split("/")[0],
                                                                                  "globalOperations")
            permission, path, instance_id = f"compute.{kind}.get", f"projects/{project}/{scope}/operations", None
        else:
            verb = rest[1] if len(rest) == 2 else {("GET", 0): "list", ("POST", 0): "create", ("GET", 1): "get",
                                                   ("DELETE", 1): "delete"}.get((method, len(rest)), method.lower())
            permission = f"compute.{collection}.{verb}"
            path = f"projects/{project}/{scope}/{collection}" + (f"/{rest[0]}" if rest else "")
            found = self.store[collection].get((project, scope), {}).get(rest[0]) if rest else None
            instance_id = found["id"] if found and collection == "instances" else None
        self.access.authorize(authorization, permission, project, path, instance_id)

    # -- offerings, regions and quotas --------------------------------------------------------
    def _offered_items(self, project: str, zone: str, collection: str) -> list[dict]:
        names = self.offerings.get(zone, {}).get(collection, [])
        kind = SINGULAR_OFFERED[collection]
        return [{"kind": f"compute#{kind}", "id": str(abs(hash((zone, n))) % 10**12), "name": n,
                 "zone": zone, "description": n,
                 "selfLink": f"{API_ROOT}projects/{project}/zones/{zone}/{collection}/{n}"} for n in names]

    def _offered(self, project: str, zone: str, collection: str, rest: list[str], query: dict) -> dict:
        items = self._offered_items(project, zone, collection)
        if rest:
            found = next((i for i in items if i["name"] == rest[0]), None)
            if found is None:
                raise ApiError(404, "notFound", f"The resource 'projects/{project}/zones/{zone}/{collection}/"
                                                f"{rest[0]}' was not found")
            return found
        terms = parse_filter(query.get("filter", ""))
        page, token = self._page([i for i in items if matches(i, terms)], query)
        out = {"kind": f"compute#{SINGULAR_OFFERED[collection]}List", "items": page}
        return {**out, "nextPageToken": token} if token else out

    def _aggregated_offered(self, project: str, collection: str, query: dict) -> dict:
        terms = parse_filter(query.get("filter", ""))
        flat = [(f"zones/{zone}", i) for zone in self.offerings for i in self._offered_items(project, zone, collection)
                if matches(i, terms)]
        page, token = self._page(flat, query)
        grouped: dict[str, dict] = {}
        for scope, item in page:
            grouped.setdefault(scope, {collection: []})[collection].append(item)
        out = {"kind": f"compute#{SINGULAR_OFFERED[collection]}AggregatedList", "items": grouped}
        return {**out, "nextPageToken": token} if token else out

    def _quota_list(self, project: str, where: str) -> list[dict]:
        return [{"metric": metric, "limit": limit, "usage": self.quota_usage(project, metric, where)}
                for (p, w, metric), limit in sorted(self.quotas.items()) if (p, w) == (project, where)]

    def _region(self, project: str, region: str) -> dict:
        zones = sorted({z for z in self.offerings if z.startswith(f"{region}-")})
        if not zones:
            raise ApiError(404, "notFound", f"The resource 'projects/{project}/regions/{region}' was not found")
        return {"kind": "compute#region", "name": region, "status": "UP",
                "selfLink": f"{API_ROOT}projects/{project}/regions/{region}",
                "zones": [f"{API_ROOT}projects/{project}/zones/{z}" for z in zones],
                "quotas": self._quota_list(project, region)}

    def _project(self, project: str) -> dict:
        return {"kind": "compute#project", "name": project, "id": str(abs(hash(project)) % 10**12),
                "selfLink": f"{API_ROOT}projects/{project}", "quotas": self._quota_list(project, "global")}

    # -- collections ------------------------------------------------------------------------
    def _find(self, collection: str, project: str, scope: str, name: str) -> dict:
        found = self.store[collection].get((project, scope), {}).get(name)
        if found is None:
            raise ApiError(404, "notFound",
                           f"The resource 'projects/{project}/{scope}/{collection}/{name}' was not found")
        return found

    def _page(self, items: list, query: dict) -> tuple[list, str]:
        size = int(query.get("maxResults") or MAX_RESULTS)
        if not 0 < size <= MAX_RESULTS:
            raise ApiError(400, "invalid", f"Invalid value for field 'maxResults': '{size}'.")
        start = int(query.get("pageToken") or 0)
        token = str(start + size) if start + size < len(items) else ""
        return items[start:start + size], token

    def _list(self, collection: str, project: str, scope: str, query: dict) -> dict:
        terms = parse_filter(query.get("filter", ""))
        items = [r for r in self.store[collection].get((project, scope), {}).values() if matches(r, terms)]
        page, token = self._page(items, query)
        out = {"kind": f"compute#{collection}List", "id": f"projects/{project}/{scope}/{collection}",
               "items": page}
        return {**out, "nextPageToken": token} if token else out

    def _aggregated(self, project: str, collection: str, query: dict) -> dict:
        if collection not in SCOPED:
            raise ApiError(404, "notFound", f"Unknown collection {collection}")
        terms = parse_filter(query.get("filter", ""))
        flat = [(scope, r) for (p, scope), rs in self.store[collection].items() if p == project
                for r in rs.values() if matches(r, terms)]
        page, token = self._page(flat, query)
        grouped: dict[str, dict] = {}
        for scope, resource in page:
            grouped.setdefault(scope, {collection: []})[collection].append(resource)
        out = {"kind": f"compute#{collection}AggregatedList", "items": grouped,
               "id": f"projects/{project}/aggregated/{collection}"}
        return {**out, "nextPageToken": token} if token else out

    def _insert(self, collection: str, project: str, scope: str, body: dict, query: dict | None = None) -> dict:
        self.inserted.append((collection, json.loads(json.dumps(body))))
        if collection == "images" and body.get("sourceDisk") and (query or {}).get("forceCreate") != "true":
            self._check_disk_not_running(project, body["sourceDisk"])
        if not body.get("name"):
            raise ApiError(400, "required", "Required field 'resource.name' not specified")
        if body["name"] in self.store[collection].get((project, scope), {}):
            raise ApiError(409, "alreadyExists",
                           f"The resource 'projects/{project}/{scope}/{collection}/{body['name']}' already exists")
        error = None
        if collection in ("instances", "firewalls", "subnetworks"):
            self._check_network_refs(project, scope, collection, body)
        if collection == "instances":
            error = self._check_instance(project, scope, body)
        if error is not None:  # the operation fails: nothing is made, not even the boot disk
            stub = {"name": body["name"], "kind": f"compute#{SINGULAR[collection]}", "id": str(next(self._ids)),
                    "selfLink": self._url(project, scope, collection, body["name"])}
            return self._operate(project, scope, "insert", stub, lambda: None, error=error)
        resource = self._build(collection, project, scope, body)
        return self._operate(project, scope, "insert", resource,
                             lambda: self._put(collection, project, scope, resource), error=error)

    def _check_network_refs(self, project: str, scope: str, collection: str, body: dict) -> None:
        """Networks and subnetworks an insert names must exist (404); an instance on a custom-mode network must
        name a subnetwork (400), as the API answers."""
        refs = [body] if collection != "instances" else body.get("networkInterfaces", [])
        for i, ref in enumerate(refs):
            subnet_ref = ref.get("subnetwork") if collection == "instances" else None
            network_ref = ref.get("network") or ("" if subnet_ref else "default")
            if network_ref:
                network = self.store["networks"].get((project, "global"), {}).get(last(network_ref))
                if network is None:
                    raise ApiError(404, "notFound",
                                   f"The resource 'projects/{project}/global/networks/{last(network_ref)}' was not found")
                if collection == "instances" and not subnet_ref and network.get("autoCreateSubnetworks") is False:
                    raise ApiError(400, "invalid", f"Invalid value for field 'resource.networkInterfaces[{i}]': ''. "
                                                   "Subnetwork should be specified for custom subnetmode network")
            if subnet_ref:
                region = scope.split("/", 1)[1].rsplit("-", 1)[0]
                if not self.store["subnetworks"].get((project, f"regions/{region}"), {}).get(last(subnet_ref)):
                    raise ApiError(404, "notFound", f"The resource 'projects/{project}/regions/{region}/subnetworks/"
                                                    f"{last(subnet_ref)}' was not found")

    def _check_instance(self, project: str, scope: str, body: dict) -> dict | None:
        """The 400s of instances.insert, then the errors its operation would end with (capacity, quota)."""
        zone = scope.split("/", 1)[1]
        policies = {r["selfLink"]: r for _, r in self.items("resourcePolicies", project)}
        try:
            check_instance(body, zone, self.offerings, policies)
        except InsertRefused as exc:
            raise ApiError(exc.code, exc.reason, exc.message) from None
        machine = last(body.get("machineType", ""))
        if (zone, machine) in self.exhausted or (zone, "*") in self.exhausted:
            return capacity_error(project, zone)
        metric, count = gpu_demand(body)
        region = zone.rsplit("-", 1)[0]
        for where, name, text in ((region, metric, f"in region {region}"), ("global", GLOBAL_GPU_METRIC, "globally")):
            limit = self.quotas.get((project, where, name)) if name else None
            if limit is not None and count and self.quota_usage(project, name, where) + count > limit:
                return quota_error(name, limit, text)
        return None

    def _delete(self, collection: str, project: str, scope: str, resource: dict) -> dict:
        self._check_unused(collection, project, resource)
        return self._operate(project, scope, "delete", resource,
                             lambda: self._remove(collection, project, scope, resource))

    def _action(self, collection: str, project: str, scope: str, resource: dict, verb: str,
                body: dict) -> dict:
        if verb == "setLabels":
            if body.get("labelFingerprint") != resource.get("labelFingerprint"):
                raise ApiError(412, "conditionNotMet", "Labels fingerprint either invalid or resource labels have "
                                                       "changed")
            commit = lambda: resource.update(labels=dict(body.get("labels", {})),
                                             labelFingerprint=f"fp{next(self._ids)}")
        elif collection == "instances" and verb in ("stop", "start"):
            commit = lambda: resource.update(status="TERMINATED" if verb == "stop" else "RUNNING")
        elif collection == "instances" and verb == "setServiceAccount":
            if resource.get("status") != "TERMINATED":  # the API changes a VM's account and scopes only when stopped
                raise ApiError(400, "resourceNotReady", f"The resource '{resource['selfLink']}' is not ready: the "
                                                        "instance must be stopped to change its service account")
            commit = lambda: resource.update(serviceAccounts=[{"email": body.get("email", ""),
                                                               "scopes": list(body.get("scopes", []))}])
        else:
            raise ApiError(400, "badRequest", f"Unsupported action {collection}.{verb}")
        return self._operate(project, scope, verb, resource, commit)

    def _check_disk_not_running(self, project: str, source_disk: str) -> None:
        """The real API refuses to image a disk that a running instance uses (unless forceCreate)."""
        parts = self._ref(project, source_disk, "disks").split("/")
        disk = self._find("disks", parts[-5], "/".join(parts[-4:-2]), parts[-1])
        for user in disk.get("users", []):
            instance = self.store["instances"].get((parts[-5], "/".join(parts[-4:-2])), {}).get(last(user))
            if instance and instance.get("status") == "RUNNING":
                raise ApiError(400, "resourceInUseByAnotherResource",
                               f"The disk resource '{disk['selfLink']}' is already being used by '{user}'")

    def _resolve_image(self, project: str, ref: str) -> dict:
        """An image by URL/path, or the newest active one of `.../images/family/F`, in any project."""
        url = self._ref(project, ref, "images")
        parts = url.split("/")
        image_project = parts[parts.index("projects") + 1]
        if parts[-2] == "family":
            return self._from_family(image_project, parts[-1])
        return self._find("images", image_project, "global", parts[-1])

    def _from_family(self, project: str, family: str) -> dict:
        live = [r for _, r in self.items("images", project) if r.get("family") == family
                and r.get("deprecated", {}).get("state", "ACTIVE") == "ACTIVE" and r.get("status") == "READY"]
        if not live:
            raise ApiError(404, "notFound",
                           f"The resource 'projects/{project}/global/images/family/{family}' was not found")
        return max(live, key=lambda r: r["creationTimestamp"])

    # -- resource building and effects -------------------------------------------------------
    def _url(self, project: str, scope: str, collection: str, name: str) -> str:
        return f"{API_ROOT}projects/{project}/{scope}/{collection}/{name}"

    def _ref(self, project: str, ref: str, collection: str, scope: str = "global") -> str:
        """Normalize a short reference (`x`, `global/networks/x`, `projects/p/...`) to a URL."""
        if ref.startswith(("http://", "https://")):
            return API_ROOT + ref.split("/compute/v1/", 1)[-1]
        if ref.startswith("projects/"):
            return API_ROOT + ref
        if "/" in ref:
            return f"{API_ROOT}projects/{project}/{ref}"
        return self._url(project, scope, collection, ref)

    def _build(self, collection: str, project: str, scope: str, body: dict) -> dict:
        seq = next(self._ids)
        stamp = (self._epoch + timedelta(milliseconds=seq)).isoformat(timespec="milliseconds")
        resource = {**body, "id": body.get("id", str(seq)), "kind": f"compute#{SINGULAR[collection]}",
                    "creationTimestamp": stamp,
                    "selfLink": self._url(project, scope, collection, body["name"])}
        if scope != "global":
            resource[scope.split("/")[0][:-1]] = f"{API_ROOT}projects/{project}/{scope}"
        if collection not in ("firewalls", "networks", "subnetworks"):
            resource.setdefault("labels", {})
            resource.setdefault("labelFingerprint", f"fp{seq}")
        build = getattr(self, f"_build_{collection}", None)
        if build:
            build(project, scope, resource)
        return resource

    def _build_instances(self, project: str, scope: str, inst: dict) -> None:
        inst.setdefault("status", "RUNNING")
        for i, nic in enumerate(inst.setdefault("networkInterfaces", [])):
            nic["network"] = self._ref(project, nic.get("network", "default"), "networks")
            if nic.get("subnetwork"):
                nic["subnetwork"] = self._ref(project, nic["subnetwork"], "subnetworks")
            nic.setdefault("name", f"nic{i}")
            nic.setdefault("networkIP", f"10.128.0.{2 + int(inst['id']) % 250}")
            for ac in nic.get("accessConfigs", []):
                ac.setdefault("natIP", f"203.0.113.{int(inst['id']) % 250}")
        for i, disk in enumerate(inst.setdefault("disks", [])):
            disk.setdefault("index", i)
            params = disk.pop("initializeParams", None)
            if params is not None:
                name = params.get("diskName") or (inst["name"] if i == 0 else f"{inst['name']}-{i}")
                body = {"name": name, "labels": params.get("labels", {})}
                body.update({k: params[k] for k in ("sizeGb", "sourceImage", "diskType") if k in params})
                if "diskSizeGb" in params:  # the API's name for it in initializeParams
                    body["sizeGb"] = params["diskSizeGb"]
                if params.get("sourceImage"):
                    image = self._resolve_image(project, params["sourceImage"])
                    body.update(sourceImage=image["selfLink"], sourceImageId=image["id"])
                    body.setdefault("sizeGb", image["diskSizeGb"])
                self._put("disks", project, scope, self._build("disks", project, scope, body))
                disk["source"] = self._url(project, scope, "disks", name)
            source = self._find("disks", project, scope, last(disk.get("source", "")))
            source.setdefault("users", []).append(inst["selfLink"])

    def _build_disks(self, project: str, scope: str, disk: dict) -> None:
        disk.setdefault("status", "READY")
        disk.setdefault("users", [])
        if disk.get("sourceImage") and "sizeGb" not in disk:
            image = self.store["images"].get((project, "global"), {}).get(last(disk["sourceImage"]))
            disk["sizeGb"] = image["diskSizeGb"] if image else "10"
        if disk.get("sourceImage"):
            image = self._resolve_image(project, disk["sourceImage"]) if "/" in disk["sourceImage"] else None
            if image and int(disk["sizeGb"]) < int(image["diskSizeGb"]):
                raise ApiError(400, "invalid", f"Requested disk size cannot be smaller than the image size "
                                               f"({image['diskSizeGb']} GB)")
        disk["sizeGb"] = str(disk.get("sizeGb", "10"))

    def _build_images(self, project: str, scope: str, image: dict) -> None:
        image.setdefault("status", "READY")
        if image.get("sourceDisk"):
            image["sourceDisk"] = self._ref(project, image["sourceDisk"], "disks")
            parts = image["sourceDisk"].split("/")
            disk = self._find("disks", parts[-5], "/".join(parts[-4:-2]), parts[-1])
            image.setdefault("diskSizeGb", disk["sizeGb"])
        image["diskSizeGb"] = str(image.get("diskSizeGb", "10"))

    def _build_firewalls(self, project: str, scope: str, rule: dict) -> None:
        rule["network"] = self._ref(project, rule.get("network", "default"), "networks")
        rule.setdefault("direction", "INGRESS")

    def _build_subnetworks(self, project: str, scope: str, subnet: dict) -> None:
        if not subnet.get("network"):
            raise ApiError(400, "required", "Required field 'resource.network' not specified")
        subnet["network"] = self._ref(project, subnet["network"], "networks")

    def _build_addresses(self, project: str, scope: str, address: dict) -> None:
        address.setdefault("address", f"198.51.100.{int(address['id']) % 250}")
        address.setdefault("status", "RESERVED")

    def _put(self, collection: str, project: str, scope: str, resource: dict) -> None:
        self.store[collection].setdefault((project, scope), {})[resource["name"]] = resource

    def _remove(self, collection: str, project: str, scope: str, resource: dict) -> None:
        self.store[collection].get((project, scope), {}).pop(resource["name"], None)
        if collection != "instances":
            return
        self.access.forget(resource["id"])  # an instance's IAM policy is the instance's
        for disk in resource.get("disks", []):
            source = self.store["disks"].get((project, scope), {}).get(last(disk.get("source", "")))
            if source is None:
                continue
            source["users"] = [u for u in source.get("users", []) if u != resource["selfLink"]]
            if disk.get("autoDelete"):
                self._remove("disks", project, scope, source)

    def _check_unused(self, collection: str, project: str, resource: dict) -> None:
        link = resource["selfLink"]
        users: list[str] = []
        if collection == "disks":
            users = resource.get("users", [])
        elif collection in ("networks", "subnetworks"):
            key = collection[:-1]
            users = [r["selfLink"] for c in ("firewalls", "subnetworks") for _, r in self.items(c, project)
                     if r.get(key) == link]
            users += [r["selfLink"] for _, r in self.items("instances", project)
                      if any(n.get(key) == link for n in r.get("networkInterfaces", []))]
        elif collection == "resourcePolicies":
            users = [r["selfLink"] for _, r in self.items("instances", project)
                     if link in r.get("resourcePolicies", [])]
        if users:
            raise ApiError(400, "resourceInUseByAnotherResource",
                           f"The {SINGULAR[collection]} resource '{link}' is already being used by '{users[0]}'")

    # -- operations -------------------------------------------------------------------------
    def _operate(self, project: str, scope: str, verb: str, resource: dict,
                 commit: Callable[[], None], error: dict | None = None) -> dict:
        name = f"operation-{next(self._ids)}"
        op = {"kind": "compute#operation", "id": str(next(self._ids)), "name": name,
              "operationType": verb, "targetLink": resource["selfLink"], "targetId": resource["id"],
              "status": "RUNNING", "progress": 0, "insertTime": self._epoch.isoformat(),
              "selfLink": f"{API_ROOT}projects/{project}/{scope}/operations/{name}"}
        if scope != "global":
            op[scope.split("/")[0][:-1]] = f"{API_ROOT}projects/{project}/{scope}"
        fault = self.faults.pop((resource["kind"].split("#")[-1], verb), None)
        if error is not None:
            self._errors[name] = {"errors": [error]}
            commit = lambda: None  # noqa: E731 - the resource is never created
        elif fault is not None:
            message, leave = fault
            self._errors[name] = {"errors": [{"code": "FAKE_FAILURE", "message": message}]}
            commit = (lambda done=commit: (done(), resource.update(status="FAILED"))) if leave else (lambda: None)
        self.operations[name] = op
        self._commits[name] = commit
        self._pending[name] = self.pending_polls
        if not self.pending_polls:
            self._finish(name)
        return dict(op)

    def _finish(self, name: str) -> None:
        op = self.operations[name]
        if op["status"] != "DONE":
            self._commits.pop(name)()
            op.update(status="DONE", progress=100, endTime=datetime.now(timezone.utc).isoformat())
            if name in self._errors:
                op.update(error=self._errors.pop(name), httpErrorStatusCode=400, httpErrorMessage="BAD REQUEST")

    def _operation(self, project: str, scope: str, rest: list[str]) -> dict:
        op = self.operations.get(rest[0]) if rest else None
        if op is None or not op["selfLink"].endswith(f"projects/{project}/{scope}/operations/{rest[0]}"):
            raise ApiError(404, "notFound", f"The resource 'projects/{project}/{scope}/operations/"
                                            f"{rest[0] if rest else ''}' was not found")
        if rest[1:] == ["wait"] or self._pending[rest[0]] <= 1:
            self._finish(rest[0])
        else:
            self._pending[rest[0]] -= 1
        return dict(op)
