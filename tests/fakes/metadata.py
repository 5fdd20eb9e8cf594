"""Local stand-ins of the two metadata endpoints the preemption watcher (workloads/preempt.py) and the autostop
watcher's self-delete (provision/data/autostop_watch.py) read.

    with FakeAwsMetadata() as imds:       # http://127.0.0.1:PORT in place of http://169.254.169.254
        imds.notice("terminate")          # from now on instance-action is 200 with the action and a time
    with FakeGcpMetadata() as gmd:        # in place of http://metadata.google.internal
        gmd.preempt()                     # preempted turns TRUE; held wait_for_change requests answer now
    with FakeGcpMetadata(node=GceNode(gce, "demo-0", "us-central1-a")) as gmd:   # a VM of tests/fakes/gce.py
        ...                               # its name, zone, project, and a token of its service account

The documented rules they follow:
- AWS IMDSv2: `PUT /latest/api/token` needs `X-aws-ec2-metadata-token-ttl-seconds` (1..21600; else 400) and
  returns a token; a GET without a valid token is 401; `spot/instance-action` is 404 until the instance is
  marked, then `{"action": ..., "time": ...}` (the time two minutes ahead, UTC, `%Y-%m-%dT%H:%M:%SZ`).
- GCP: a request without `Metadata-Flavor: Google` is 403; `instance/preempted` is `FALSE` or `TRUE`;
  `?wait_for_change=true` holds the request until the value changes (or `timeout_sec` passes, then answers
  the unchanged value); responses carry `Metadata-Flavor: Google`. For a node: `instance/name`, `instance/zone`
  (`projects/NUMBER/zones/ZONE`: the project *number*), `project/project-id`, and
  `instance/service-accounts/default/{email,token}`; the token is JSON `{"access_token", "expires_in",
  "token_type": "Bearer"}` for the VM's service account with the VM's scopes, which the fake Compute endpoint then
  knows (FakeCompute.access.issue); a VM without a service account has no `default` (404).
"""

from __future__ import annotations

import json
import secrets
import threading
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

AWS_WARNING = timedelta(minutes=2)


class _Server:
    handler: type[BaseHTTPRequestHandler]

    def __init__(self):
        self.lock = threading.Condition()
        self.requests: list[tuple[str, str]] = []
        fake = self

        class Handler(self.handler):  # type: ignore[misc, valid-type]
            server_fake = fake

            def log_message(self, *args):  # quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)  # quick to stop

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        with self.lock:
            self.lock.notify_all()
        self.httpd.shutdown()
        self.httpd.server_close()


def reply(handler: BaseHTTPRequestHandler, code: int, body: str, headers: dict[str, str] | None = None) -> None:
    data = body.encode()
    handler.send_response(code)
    headers = dict(headers or {})
    handler.send_header("Content-Type", headers.pop("Content-Type", "text/plain"))
    handler.send_header("Content-Length", str(len(data)))
    for k, v in headers.items():
        handler.send_header(k, v)
    handler.end_headers()
    handler.wfile.write(data)


class _AwsHandler(BaseHTTPRequestHandler):
    server_fake: FakeAwsMetadata

    def do_PUT(self):
        fake = self.server_fake
        fake.requests.append(("PUT", self.path))
        if self.path != "/latest/api/token":
            return reply(self, 404, "Not Found")
        ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
        if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
            return reply(self, 400, "Bad Request")
        token = secrets.token_urlsafe(24)
        fake.tokens.add(token)
        reply(self, 200, token, {"X-aws-ec2-metadata-token-ttl-seconds": ttl})

    def do_GET(self):
        fake = self.server_fake
        fake.requests.append(("GET", self.path))
        if self.headers.get("X-aws-ec2-metadata-token") not in fake.tokens:
            return reply(self, 401, "Unauthorized")
        if self.path != "/latest/meta-data/spot/instance-action" or fake.action is None:
            return reply(self, 404, "Not Found")
        reply(self, 200, json.dumps(fake.action))


class FakeAwsMetadata(_Server):
    handler = _AwsHandler

    def __init__(self):
        self.tokens: set[str] = set()
        self.action: dict | None = None
        super().__init__()

    def notice(self, action: str = "terminate") -> None:
        when = datetime.now(timezone.utc) + AWS_WARNING
        self.action = {"action": action, "time": when.strftime("%Y-%m-%dT%H:%M:%SZ")}

    def expire_tokens(self) -> None:
        self.tokens.clear()


class GceNode:
    """The VM of tests/fakes/gce.py that a FakeGcpMetadata serves: what its metadata server knows of it."""

    def __init__(self, gce, name: str, zone: str, project: str = ""):
        self.gce, self.name, self.zone, self.project = gce, name, zone, project or gce.project
        self.number = str(abs(hash(self.project)) % 10**12)  # the project number, as projects.get gives it

    def answer(self, path: str) -> str | None:
        values = {"instance/name": self.name, "instance/zone": f"projects/{self.number}/zones/{self.zone}",
                  "project/project-id": self.project, "project/numeric-project-id": self.number}
        if path in values:
            return values[path]
        account = self.account()
        if account is None or not path.startswith("instance/service-accounts/default/"):
            return None
        if path.endswith("/email"):
            return account["email"]
        if path.endswith("/token"):
            token = self.gce.access.issue(account["email"], account.get("scopes", []))
            return json.dumps({"access_token": token, "expires_in": 3599, "token_type": "Bearer"})
        return None

    def account(self) -> dict | None:
        vm = self.gce.get("instances", f"zones/{self.zone}", self.name, project=self.project) or {}
        accounts = vm.get("serviceAccounts") or []
        return accounts[0] if accounts else None


class _GcpHandler(BaseHTTPRequestHandler):
    server_fake: FakeGcpMetadata

    def do_GET(self):
        fake = self.server_fake
        url = urlparse(self.path)
        query = parse_qs(url.query)
        fake.requests.append(("GET", self.path))
        if self.headers.get("Metadata-Flavor") != "Google":
            return reply(self, 403, "Missing Metadata-Flavor:Google header.")
        prefix = "/computeMetadata/v1/"
        if fake.node is not None and url.path != prefix + "instance/preempted":
            value = fake.node.answer(url.path[len(prefix):]) if url.path.startswith(prefix) else None
            if value is None:
                return reply(self, 404, "Not Found", {"Metadata-Flavor": "Google"})
            kind = "application/json" if value.startswith("{") else "text/plain"
            return reply(self, 200, value, {"Metadata-Flavor": "Google", "Content-Type": kind})
        if url.path != prefix + "instance/preempted":
            return reply(self, 404, "Not Found", {"Metadata-Flavor": "Google"})
        if query.get("wait_for_change", [""])[0].lower() == "true":
            timeout = float(query.get("timeout_sec", ["300"])[0])
            with fake.lock:
                start = fake.preempted
                fake.lock.wait_for(lambda: fake.preempted != start or fake.closing, timeout=timeout)
        reply(self, 200, "TRUE" if fake.preempted else "FALSE", {"Metadata-Flavor": "Google"})


class FakeGcpMetadata(_Server):
    handler = _GcpHandler

    def __init__(self, node: GceNode | None = None):
        self.preempted = False
        self.closing = False
        self.node = node
        super().__init__()

    def preempt(self) -> None:
        with self.lock:
            self.preempted = True
            self.lock.notify_all()

    def __exit__(self, *exc):
        with self.lock:
            self.closing = True
        super().__exit__(*exc)
