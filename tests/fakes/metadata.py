"""Local stand-ins of the two metadata endpoints the preemption watcher reads (workloads/preempt.py).

    with FakeAwsMetadata() as imds:       # http://127.0.0.1:PORT in place of http://169.254.169.254
        imds.notice("terminate")          # from now on instance-action is 200 with the action and a time
    with FakeGcpMetadata() as gmd:        # in place of http://metadata.google.internal
        gmd.preempt()                     # preempted turns TRUE; held wait_for_change requests answer now

The documented rules they follow:
- AWS IMDSv2: `PUT /latest/api/token` needs `X-aws-ec2-metadata-token-ttl-seconds` (1..21600; else 400) and
  returns a token; a GET without a valid token is 401; `spot/instance-action` is 404 until the instance is
  marked, then `{"action": ..., "time": ...}` (the time two minutes ahead, UTC, `%Y-%m-%dT%H:%M:%SZ`).
- GCP: a request without `Metadata-Flavor: Google` is 403; `instance/preempted` is `FALSE` or `TRUE`;
  `?wait_for_change=true` holds the request until the value changes (or `timeout_sec` passes, then answers
  the unchanged value); responses carry `Metadata-Flavor: Google`.
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
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

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
    handler.send_header("Content-Type", "text/plain")
    handler.send_header("Content-Length", str(len(data)))
    for k, v in (headers or {}).items():
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


class _GcpHandler(BaseHTTPRequestHandler):
    server_fake: FakeGcpMetadata

    def do_GET(self):
        fake = self.server_fake
        url = urlparse(self.path)
        query = parse_qs(url.query)
        fake.requests.append(("GET", self.path))
        if self.headers.get("Metadata-Flavor") != "Google":
            return reply(self, 403, "Missing Metadata-Flavor:Google header.")
        if url.path != "/computeMetadata/v1/instance/preempted":
            return reply(self, 404, "Not Found", {"Metadata-Flavor": "Google"})
        if query.get("wait_for_change", [""])[0].lower() == "true":
            timeout = float(query.get("timeout_sec", ["300"])[0])
            with fake.lock:
                start = fake.preempted
                fake.lock.wait_for(lambda: fake.preempted != start or fake.closing, timeout=timeout)
        reply(self, 200, "TRUE" if fake.preempted else "FALSE", {"Metadata-Flavor": "Google"})


class FakeGcpMetadata(_Server):
    handler = _GcpHandler

    def __init__(self):
        self.preempted = False
        self.closing = False
        super().__init__()

    def preempt(self) -> None:
        with self.lock:
            self.preempted = True
            self.lock.notify_all()

    def __exit__(self, *exc):
        with self.lock:
            self.closing = True
        super().__exit__(*exc)
