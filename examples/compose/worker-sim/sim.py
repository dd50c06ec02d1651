#!/usr/bin/env python3
"""Worker simulator of the compose demo: test executions, published like real workers do.

Each organization runs a few executions at a time, each going PENDING -> RUNNING (with
progress) -> PASSED, FAILED or ERROR, and sending a log line per test case, through the
ingest API (POST /executions/update and /executions/log with the ingest key). In compose
that is HAProxy's ingest frontend, which spreads the requests over the ready replicas.

It also serves the dashboard's static files (examples/dashboard/, under /dashboard/; in
compose, HAProxy's public frontend routes /dashboard/ here, so that the page shares fanout's
origin) and mints demo tokens: GET /token?org=acme answers a one-hour token signed with
JWT_SECRET, and GET /?org=acme redirects to the dashboard with such a token in the URL's
fragment. That is what makes the demo work without copying a token, and why it is a demo
and nothing else: anyone who can reach that port gets a token for any organization.

Python standard library only, so it runs in the stock python image. Settings (environment):

  INGEST_URL     ingest API base URL                     (http://haproxy:3001)
  INGEST_KEY     one of the replicas' FANOUT_INGEST_KEYS  (required)
  JWT_SECRET     the replicas' JWT_SECRET                 (required)
  ORGS           comma-separated organizations            (acme,globex,initech)
  CONCURRENCY    executions running at once per org       (2)
  SPEED          time factor: 2 runs twice as fast        (1)
  EXECUTIONS     executions per org slot, then exit; 0 = forever (0)
  PUBLIC_URL     fanout as the browser reaches it         (http://localhost:3000)
                 (the dashboard is PUBLIC_URL/dashboard/, through the balancer)
  DEMO_URL       this server as the browser reaches it    (http://localhost:8080)
  DEMO_LISTEN    host:port of this server; empty: none    (0.0.0.0:8080)
  DASHBOARD_DIR  the dashboard's files                    (../../dashboard from here)
  INGEST_HOST_URL  the ingest API as the host reaches it, for the printed curl line
                                                          (http://localhost:3001)
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import random
import re
import signal
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HERE = Path(__file__).resolve().parent
# What the dashboard's folder holds, as served: nothing else is.
STATIC_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".md": "text/plain; charset=utf-8",
    "": "text/plain; charset=utf-8",  # LICENSE
}
ORG_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")

SUITES = {
    "checkout-e2e": ["adds item to cart", "applies coupon", "pays by card", "pays by invoice",
                     "shows receipt", "sends confirmation mail", "handles declined card"],
    "search-api": ["empty query", "exact match", "fuzzy match", "facets", "pagination",
                   "sort by price", "unicode terms", "rate limit"],
    "mobile-smoke": ["cold start", "login", "push registration", "offline banner", "logout"],
    "billing-integration": ["creates invoice", "prorates upgrade", "refunds", "tax by region",
                            "currency rounding", "dunning emails"],
    "data-pipeline": ["ingest batch", "dedupe", "schema drift", "backfill", "export parquet"],
}
BRANCHES = ["main", "main", "main", "release/2.4", "feat/faster-search", "fix/coupon-rounding"]
STOP = threading.Event()


def setting(name: str, default: str | None = None) -> str:
    value = os.environ.get(name, default)
    if value is None or value == "":
        if default is None:
            sys.exit(f"worker-sim: {name} is not set")
    return value


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def mint_token(secret: str, org: str, user: str, role: str = "viewer", ttl: int = 3600) -> str:
    """An HS256 JWT with the claims fanout requires (userId, organizationId, role, exp)."""
    now = int(time.time())
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    claims = {"userId": user, "organizationId": org, "role": role, "iat": now, "exp": now + ttl}
    body = b64url(json.dumps(claims, separators=(",", ":")).encode())
    signature = hmac.new(secret.encode(), f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{b64url(signature)}"


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


class Ingest:
    """POSTs to the ingest API, retrying what fanout says to retry (no answer, 503)."""

    def __init__(self, base_url: str, key: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.key = key
        self.down_since: float | None = None
        self.lock = threading.Lock()

    def post(self, route: str, body: dict) -> bool:
        data = json.dumps(body).encode()
        delay = 0.5
        while not STOP.is_set():
            request = urllib.request.Request(
                self.base_url + route,
                data=data,
                method="POST",
                headers={"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"},
            )
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    response.read()
                self.up()
                return True
            except urllib.error.HTTPError as err:
                answer = err.read().decode(errors="replace")
                if err.code != 503:
                    # A 4xx says what is wrong with this request: retrying would not help.
                    print(f"worker-sim: {route} answered {err.code} {answer}", flush=True)
                    return False
                self.down(f"503 {answer}")
            except (urllib.error.URLError, OSError) as err:
                self.down(str(getattr(err, "reason", err)))
            STOP.wait(delay)
            delay = min(delay * 2, 5.0)
        return False

    def down(self, why: str) -> None:
        with self.lock:
            if self.down_since is None:
                self.down_since = time.time()
                print(f"worker-sim: ingest not available yet ({why}); retrying", flush=True)

    def up(self) -> None:
        with self.lock:
            if self.down_since is not None:
                print(f"worker-sim: ingest available after {time.time() - self.down_since:.1f}s",
                      flush=True)
                self.down_since = None


def run_execution(ingest: Ingest, org: str, speed: float, rng: random.Random) -> str | None:
    """One execution from PENDING to its final status; returns that status."""

    def pause(low: float, high: float) -> bool:
        return not STOP.wait(rng.uniform(low, high) / speed)

    suite = rng.choice(list(SUITES))
    cases = rng.sample(SUITES[suite], k=rng.randint(3, len(SUITES[suite])))
    task_id = f"{suite}-{rng.getrandbits(32):08x}"
    fails = rng.random() < 0.2
    errors = not fails and rng.random() < 0.04
    failing_case = rng.randrange(len(cases)) if fails else -1
    base = {
        "organizationId": org,
        "taskId": task_id,
        "suite": suite,
        "branch": rng.choice(BRANCHES),
        "commit": f"{rng.getrandbits(28):07x}",
        "worker": f"runner-{rng.randint(1, 8)}",
    }
    progress = {"done": 0, "passed": 0, "failed": 0, "total": len(cases)}

    def update(status: str, **extra) -> bool:
        return ingest.post("/executions/update", {**base, "status": status, "progress": dict(progress), **extra})

    def log(line: str) -> bool:
        return ingest.post("/executions/log", {"organizationId": org, "taskId": task_id, "log": line})

    queued = time.time()
    if not update("PENDING", queuedAt=iso(queued)) or not pause(0.5, 2.5):
        return None
    started = time.time()
    if not update("RUNNING", startedAt=iso(started)):
        return None
    log(f"{base['worker']}: checked out {base['branch']}@{base['commit']}, running {len(cases)} tests")
    for i, case in enumerate(cases):
        if not pause(0.4, 2.0):
            return None
        if errors and i == len(cases) // 2:
            log("runner lost connection to the browser farm: giving up")
            final = "ERROR"
            break
        ms = rng.randint(40, 2500)
        if i == failing_case:
            progress["failed"] += 1
            log(f"✗ {case} ({ms} ms): expected 200, got 500")
        else:
            progress["passed"] += 1
            log(f"✓ {case} ({ms} ms)")
        progress["done"] += 1
        update("RUNNING")
    else:
        final = "FAILED" if progress["failed"] else "PASSED"
    finished = time.time()
    update(final, finishedAt=iso(finished), durationMs=int((finished - started) * 1000))
    print(f"worker-sim: {org} {task_id} {final} ({progress['done']}/{len(cases)} tests, "
          f"{finished - started:.1f}s)", flush=True)
    return final


def worker_loop(ingest: Ingest, org: str, speed: float, count: int) -> None:
    rng = random.Random()
    done = 0
    while not STOP.is_set() and (count == 0 or done < count):
        if run_execution(ingest, org, speed, rng) is None:
            return
        done += 1
        STOP.wait(rng.uniform(0.5, 3.0) / speed)


class DemoHandler(BaseHTTPRequestHandler):
    """The dashboard's files, and the demo's tokens."""

    secret = ""
    orgs: list[str] = []
    dashboard_url = ""
    dashboard_dir = HERE

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        if url.path.startswith("/dashboard/"):
            self.static(urllib.parse.unquote(url.path[len("/dashboard/"):]))
        elif url.path == "/dashboard":
            self.redirect("/dashboard/")
        elif url.path in ("/", "/token"):
            org = query.get("org", [self.orgs[0]])[0]
            user = query.get("user", ["demo-viewer"])[0]
            if not ORG_ID.match(org) or not 0 < len(user) <= 256:
                self.reply_json(400, {"error": "org must be 1-128 of [A-Za-z0-9._-]; user 1-256 characters"})
                return
            ttl = 3600
            token = mint_token(self.secret, org, user, ttl=ttl)
            if url.path == "/":
                # The dashboard through the balancer, logged in (the fragment never leaves the browser).
                self.redirect(f"{self.dashboard_url}#token={token}")
            else:
                self.reply_json(200, {"token": token, "organizationId": org, "userId": user, "expiresIn": ttl})
        else:
            self.reply_json(404, {"error": "not found"})

    def static(self, name: str) -> None:
        root = self.dashboard_dir
        try:
            path = (root / (name or "index.html")).resolve()
            inside = root in path.parents and not any(p.startswith(".") for p in path.relative_to(root).parts)
            found = inside and path.is_file() and path.suffix in STATIC_TYPES
        except (ValueError, OSError):  # a NUL byte, a name too long
            found = False
        if not found:
            self.reply_json(404, {"error": "not found"})
            return
        self.reply(200, path.read_bytes(), STATIC_TYPES[path.suffix])

    def redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()

    def reply_json(self, status: int, body: dict) -> None:
        self.reply(status, json.dumps(body).encode(), "application/json")

    def reply(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:  # quiet: a line per request would bury the executions
        pass


def main() -> int:
    ingest_url = setting("INGEST_URL", "http://haproxy:3001")
    key = setting("INGEST_KEY")
    secret = setting("JWT_SECRET")
    orgs = [o.strip() for o in setting("ORGS", "acme,globex,initech").split(",") if o.strip()]
    bad = [o for o in orgs if not ORG_ID.match(o)]
    if not orgs or bad:
        sys.exit(f"worker-sim: invalid ORGS {bad or orgs}: comma-separated ids of [A-Za-z0-9._-]")
    concurrency = int(setting("CONCURRENCY", "2"))
    speed = float(setting("SPEED", "1"))
    count = int(setting("EXECUTIONS", "0"))
    public_url = setting("PUBLIC_URL", "http://localhost:3000")
    demo_url = setting("DEMO_URL", "http://localhost:8080")
    demo_listen = os.environ.get("DEMO_LISTEN", "0.0.0.0:8080")
    dashboard_dir = Path(setting("DASHBOARD_DIR", str(HERE.parent.parent / "dashboard"))).resolve()
    dashboard_url = f"{public_url.rstrip('/')}/dashboard/"
    ingest_host_url = setting("INGEST_HOST_URL", "http://localhost:3001")

    signal.signal(signal.SIGTERM, lambda *_: STOP.set())
    signal.signal(signal.SIGINT, lambda *_: STOP.set())

    if demo_listen:
        if not (dashboard_dir / "index.html").is_file():
            sys.exit(f"worker-sim: no index.html in DASHBOARD_DIR {dashboard_dir}")
        host, _, port = demo_listen.rpartition(":")
        DemoHandler.secret = secret
        DemoHandler.orgs = orgs
        DemoHandler.dashboard_url = dashboard_url
        DemoHandler.dashboard_dir = dashboard_dir
        server = ThreadingHTTPServer((host or "0.0.0.0", int(port)), DemoHandler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()

    token = mint_token(secret, orgs[0], "you", ttl=12 * 3600)
    print(
        f"""
=== fanout demo: NOT FOR PRODUCTION (fixed demo secrets in docker-compose.yml) ===
Live dashboard:  {demo_url}/   (a fresh token, then {dashboard_url} through the balancer;
                 other organizations: {demo_url}/?org={orgs[-1]})
Token (org "{orgs[0]}", user "you", 12h):
{token}
Or directly:     {dashboard_url}#token={token}
Socket.IO:       io("{public_url}", {{ auth: {{ token }} }})
REST history:    curl -H "Authorization: Bearer $TOKEN" {public_url}/v1/executions
Publish:         curl -X POST {ingest_host_url}/executions/update -H 'Authorization: Bearer {key}' \\
                   -d '{{"organizationId":"{orgs[0]}","taskId":"t-1","status":"RUNNING"}}'
Publishing executions for {", ".join(orgs)} through {ingest_url}
""",
        flush=True,
    )

    ingest = Ingest(ingest_url, key)
    threads = [
        threading.Thread(target=worker_loop, args=(ingest, org, speed, count), daemon=True)
        for org in orgs
        for _ in range(concurrency)
    ]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive() and not STOP.is_set():
            t.join(0.5)
    STOP.set()
    return 0


if __name__ == "__main__":
    sys.exit(main())
