#!/usr/bin/env python3
"""Checks of the Docker side (Dockerfile, .dockerignore, docker-compose.yml and
examples/compose/); run by scripts/test-deploy.

No Docker engine is needed. Given `docker-compose config` (the file as Compose reads it),
it checks:

1. the Dockerfile: multi-stage, pinned base images, a release build of the locked
   workspace, the final stage running as the non-root uid the Kubernetes manifests expect,
   the ports they expect, the binary where they call it, and a HEALTHCHECK on the internal
   port whose probe is copied into the image;
2. the build context: what .dockerignore lets through is exactly what the Dockerfile copies
   (no target/, node_modules/, .git/), and everything it copies is there;
3. the HEALTHCHECK probe itself: the very binary the build stage copies (busybox-static's
   wget, extracted from Debian's package by scripts/test-deploy), run with the Dockerfile's
   arguments against a running fanout (port substituted): 0 while it serves, not 0 once
   it is gone;
4. docker-compose.yml against examples/compose/: three identical replicas behind HAProxy,
   the balancer's server lines naming exactly those replicas (public port for the
   dashboards, checks of /readyz on the internal port, sticky cookie, timeouts above the
   Engine.IO ping), Prometheus scraping each replica and loading the project's alert rules,
   Grafana provisioned with the project's dashboard, the worker simulator using the
   replicas' keys, the dashboard page (examples/dashboard/) served by the simulator and
   routed by HAProxy's public frontend under /dashboard/ (fanout's origin), healthchecks
   and depends_on conditions, ports on loopback only, every bind mount present.

The dashboard (k8s/observability/grafana/) belongs to the observability work: when it is
missing, the check says so on a line of its own instead of failing.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import yaml

from checks import Failures, step

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "examples" / "compose"
DASHBOARD = ROOT / "examples" / "dashboard"
REPLICAS = ["fanout-1", "fanout-2", "fanout-3"]
PUBLIC_PORT, INTERNAL_PORT = 3000, 3001
# Engine.IO defaults (README): a balancer's idle timeouts must exceed interval + timeout.
PING_INTERVAL, PING_TIMEOUT = 25, 20
OBSERVABILITY = ROOT / "k8s" / "observability"
# The alert rules, their one copy (the Helm chart's).
ALERTS = ROOT / "helm" / "fanout" / "files" / "alerts.yaml"





def pending(message: str) -> None:
    """Something this check cannot look at yet, said out loud rather than skipped."""
    print(f"  ! {message}", flush=True)


def seconds(value: str, default_unit: str = "s") -> float:
    """"25s", "1m30s", "500ms", "1h" (HAProxy: a bare number is in ms) in seconds."""
    units = {"us": 1e-6, "ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value) * units[default_unit]
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h|d)", value)
    if not parts or "".join(n + u for n, u in parts) != value:
        raise ValueError(f"not a duration: {value!r}")
    return sum(float(n) * units[u] for n, u in parts)


# --- 1. Dockerfile ----------------------------------------------------------------------


@dataclass
class Instruction:
    line: int
    keyword: str
    args: str

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form CMD/ENTRYPOINT/HEALTHCHECK CMD, else None."""
        text = self.args
        if self.keyword == "HEALTHCHECK":
            text = re.sub(r"^(--\S+\s+)*CMD\s+", "", text)
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return None
        return value if isinstance(value, list) else None

    def flags(self) -> dict[str, str]:
        return dict(re.findall(r"--([a-z-]+)=(\S+)", self.args))


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, with continuation lines joined."""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    logical: list[tuple[int, str]] = []
    buffer, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if buffer and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer += stripped[:-1] + " "
            continue
        logical.append((start, buffer + stripped))
        buffer = ""
    for number, line in logical:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            image, _, alias = re.sub(r"--platform=\S+\s+", "", rest).partition(" AS ")
            for name, value in args.items():
                image = image.replace(f"${{{name}}}", value).replace(f"${name}", value)
            stages.append(Stage(image.strip(), alias.strip() or None))
        elif not stages:
            if keyword == "ARG":
                name, _, value = rest.partition("=")
                args[name] = value
        else:
            stages[-1].instructions.append(Instruction(number, keyword, rest))
    return args, stages


def deployment_container() -> tuple[dict, dict]:
    """The pod spec and container of k8s/base/deployment.yaml: what the image must fit."""
    deployment = yaml.safe_load((ROOT / "k8s" / "base" / "deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    return pod, pod["containers"][0]


def check_dockerfile(stages: list[Stage], failures: Failures) -> tuple[list[str], str]:
    """Returns the sources the Dockerfile copies from the context and the HEALTHCHECK probe."""
    where = "Dockerfile"
    failures.check(len(stages) >= 2, where, "must be multi-stage (a build stage and a small final one)")
    for stage in stages:
        image = stage.image
        failures.check(
            ("@sha256:" in image or re.search(r":[^/]+$", image)) and not image.endswith(":latest"),
            where,
            f"base image {image!r} must be pinned to a tag or digest (not latest)",
        )
    build, final = stages[0], stages[-1]
    failures.check(
        any("cargo build --release --locked -p fanout" in r.args for r in build.all("RUN")),
        where,
        "the build stage must run `cargo build --release --locked -p fanout`",
    )
    failures.check(
        not any(w in final.image for w in ("rust:", "rust-")),
        where,
        f"the final stage must not be the Rust toolchain image ({final.image})",
    )
    failures.check(
        final.image.startswith("gcr.io/distroless/cc") or re.match(r"debian:\S*slim", final.image),
        where,
        f"the final stage must be small (distroless cc or debian slim), not {final.image}",
    )

    pod, container = deployment_container()
    uid = pod["securityContext"]["runAsUser"]
    gid = pod["securityContext"].get("runAsGroup", uid)
    users = final.all("USER")
    if failures.check(users, where, "the final stage needs a USER"):
        user = users[-1].args
        failures.check(
            re.fullmatch(r"\d+(:\d+)?", user) and int(user.split(":")[0]) != 0,
            where,
            f"USER {user!r} must be a numeric non-root uid (runAsNonRoot can check only those)",
        )
        failures.check(
            user in (str(uid), f"{uid}:{gid}"),
            where,
            f"USER {user!r} must be {uid}:{gid}, the runAsUser/runAsGroup of k8s/base/deployment.yaml",
        )
    exposed = {int(p.split("/")[0]) for e in final.all("EXPOSE") for p in e.args.split()}
    k8s_ports = {p["containerPort"] for p in container["ports"]}
    failures.check(
        exposed == {PUBLIC_PORT, INTERNAL_PORT} == k8s_ports,
        where,
        f"EXPOSE {sorted(exposed)} must be {PUBLIC_PORT} and {INTERNAL_PORT}, as in k8s/ ({sorted(k8s_ports)})",
    )

    copied_to = {}
    for c in final.all("COPY"):
        parts = shlex.split(c.args)
        parts = [p for p in parts if not p.startswith("--")]
        copied_to[parts[-1]] = c
    binary = container["command"][0]
    failures.check(
        binary in copied_to and "--from=" in copied_to[binary].args,
        where,
        f"the final stage must COPY the binary from the build stage to {binary}, the command of k8s/",
    )
    entrypoints = final.all("ENTRYPOINT")
    failures.check(
        entrypoints and entrypoints[-1].exec_form() == [binary],
        where,
        f"ENTRYPOINT must be [\"{binary}\"] (exec form: signals reach fanout as PID 1)",
    )

    probe: list[str] = []
    checks = final.all("HEALTHCHECK")
    if failures.check(checks, where, "the final stage needs a HEALTHCHECK"):
        check = checks[-1]
        probe = check.exec_form() or []
        failures.check(probe, where, "HEALTHCHECK CMD must be in exec form (the image has no shell)")
        url = next((a for a in probe if a.startswith("http")), "")
        failures.check(
            re.fullmatch(rf"http://(127\.0\.0\.1|localhost):{INTERNAL_PORT}/(healthz|readyz)", url),
            where,
            f"HEALTHCHECK must probe /healthz or /readyz on the internal port {INTERNAL_PORT}, not {url!r}",
        )
        failures.check(
            probe and probe[0] in copied_to,
            where,
            f"the HEALTHCHECK probe {probe[:1]} must be copied into the final stage",
        )
        flags = check.flags()
        timeout = seconds(flags.get("timeout", "30s"))
        failures.check(
            timeout <= seconds(flags.get("interval", "30s")),
            where,
            "HEALTHCHECK --timeout must not exceed --interval",
        )

    sources = []
    for stage in stages:
        for c in stage.all("COPY") + stage.all("ADD"):
            if "--from=" in c.args:
                continue
            parts = [p for p in shlex.split(c.args) if not p.startswith("--")]
            sources.extend(parts[:-1])
    return sources, " ".join(probe)


# --- 2. build context -------------------------------------------------------------------


def ignore_patterns(text: str) -> list[tuple[bool, re.Pattern]]:
    """.dockerignore as Docker reads it: (negated, regex) in order, the last match wins."""
    patterns = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = str(PurePosixPath(line.lstrip("!").strip().lstrip("/")))
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        patterns.append((negated, re.compile(regex + "$")))
    return patterns


def in_context(path: str, patterns: list[tuple[bool, re.Pattern]]) -> bool:
    """Whether `path` (relative, a file) is sent: a pattern matching a parent matches it too."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for negated, regex in patterns:
        if any(regex.match(p) for p in prefixes):
            excluded = not negated
    return not excluded


def check_context(sources: list[str], failures: Failures) -> int:
    where = ".dockerignore"
    patterns = ignore_patterns((ROOT / ".dockerignore").read_text())
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    sent = [f for f in tracked if in_context(f, patterns)]
    for source in sources:
        clean = str(PurePosixPath(source))
        failures.check(
            any(f == clean or f.startswith(clean + "/") for f in sent),
            where,
            f"the Dockerfile copies {source!r}, which the build context leaves out",
        )
        failures.check((ROOT / clean).exists(), "Dockerfile", f"COPY {source}: no such path")
    copied = [str(PurePosixPath(s)) for s in sources]
    extra = [f for f in sent if not any(f == c or f.startswith(c + "/") for c in copied)]
    failures.check(not extra, where, f"sends files the Dockerfile never copies: {extra[:10]}")
    for never in [
        "target/release/fanout",
        "target/debug/deps/x.rlib",
        "src/target/x",
        "tests/node/node_modules/socket.io-client/package.json",
        "loadtest/peers/socketio-node/node_modules/x/index.js",
        "src/node_modules/x",
        ".git/HEAD",
        "tests/node/harness.mjs",
        "k8s/base/deployment.yaml",
    ]:
        failures.check(not in_context(never, patterns), where, f"must keep {never} out of the build context")
    check_workspace_loads(sent, failures)
    return len(sent)


def check_workspace_loads(sent: list[str], failures: Failures) -> None:
    """Cargo can read the workspace from the build context alone: every member and path
    dependency (testkit/, the vendored crates) is in it. `cargo metadata` reads every
    manifest and the lock file without compiling anything. It reads them for the host's
    platform only (the image builds on Linux): unfiltered, it needs the sources of every
    platform's packages (Windows console crates, say), which a fresh machine never fetched."""
    import shutil
    import tempfile

    host = next(
        line.split(":", 1)[1].strip()
        for line in subprocess.run(["rustc", "-vV"], capture_output=True, text=True, check=True).stdout.splitlines()
        if line.startswith("host:")
    )
    with tempfile.TemporaryDirectory() as tmp:
        for f in sent:
            (Path(tmp) / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, Path(tmp) / f)
        run = subprocess.run(
            ["cargo", "metadata", "--locked", "--filter-platform", host, "--format-version", "1"],
            cwd=tmp,
            capture_output=True,
            text=True,
        )
        error = run.stderr.strip().splitlines()
        failures.check(
            run.returncode == 0,
            ".dockerignore",
            f"cargo cannot read the workspace from the build context: {' '.join(error[:4])}",
        )


# --- 3. HEALTHCHECK probe ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_probe(probe: str, probe_binary: Path, fanout: Path, failures: Failures) -> None:
    """Runs the HEALTHCHECK command (its probe mapped to `probe_binary`, the internal port to
    a free one) against a fanout that serves, then against none."""
    where = "Dockerfile HEALTHCHECK"
    argv = shlex.split(probe)
    public, internal = free_port(), free_port()
    argv = [str(probe_binary)] + [a.replace(f":{INTERNAL_PORT}/", f":{internal}/") for a in argv[1:]]
    env = {
        "PATH": "/usr/bin:/bin",
        "FANOUT_LISTEN": f"127.0.0.1:{public}",
        "FANOUT_INTERNAL_LISTEN": f"127.0.0.1:{internal}",
        "JWT_SECRET": "compose-check",
        "FANOUT_INGEST_KEYS": "compose-check",
        "FANOUT_BUS": "memory",
    }
    server = subprocess.Popen([str(fanout), "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{internal}/healthz", timeout=1):
                    break
            except OSError:
                if server.poll() is not None:
                    failures.check(False, where, f"fanout did not start: {server.stderr.read().decode()}")
                    return
                time.sleep(0.1)
        up = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        failures.check(
            up.returncode == 0,
            where,
            f"{' '.join(argv)} exited {up.returncode} against a serving replica: {up.stderr.strip()}",
        )
    finally:
        server.terminate()
        server.wait(10)
    down = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    failures.check(
        down.returncode > 0,
        where,
        f"{' '.join(argv)} exited {down.returncode} with nothing listening (expected a failure, not a crash)",
    )


# --- 4. docker-compose.yml and examples/compose/ ----------------------------------------


def haproxy_sections(text: str) -> dict[str, list[list[str]]]:
    """"frontend public" -> its lines, split into words (comments removed)."""
    sections: dict[str, list[list[str]]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        words = line.split()
        if not raw[0].isspace():
            current = " ".join(words[:2])
            sections[current] = []
        elif current is not None:
            sections[current].append(words)
    return sections


def directives(section: list[list[str]], *keyword: str) -> list[list[str]]:
    n = len(keyword)
    return [w[n:] for w in section if w[:n] == list(keyword)]


def bind_mounts(service: dict) -> dict[str, Path]:
    """Container path -> host path of the service's bind mounts (as `docker-compose config` prints them)."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, _, rest = volume.partition(":")
            target = rest.split(":")[0]
            kind = "bind" if source.startswith(("/", ".")) else "volume"
        else:
            source, target, kind = volume.get("source", ""), volume["target"], volume.get("type")
        if kind == "bind":
            mounts[target] = Path(source)
    return mounts


def host_path(mounts: dict[str, Path], container_path: str) -> Path | None:
    """Where a path inside the container comes from on the host, through its bind mounts."""
    path = PurePosixPath(container_path)
    for target, source in sorted(mounts.items(), key=lambda m: -len(m[0])):
        try:
            return source / path.relative_to(target)
        except ValueError:
            continue
    return None


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    return {k: str(v) for k, v in env.items()}


def published(service: dict) -> list[tuple[str, int, int]]:
    """(host ip, host port, container port) of the service's published ports."""
    out = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            out.append((port.get("host_ip", ""), int(port["published"]), int(port["target"])))
        else:
            parts = str(port).split(":")
            ip = parts[0] if len(parts) == 3 else ""
            out.append((ip, int(parts[-2]), int(parts[-1].split("/")[0])))
    return out


def check_compose(config: dict, failures: Failures) -> None:
    where = "docker-compose.yml"
    services = config.get("services", {})
    expected = {"redis", "postgres", *REPLICAS, "haproxy", "prometheus", "grafana", "worker-sim"}
    failures.check(expected <= set(services), where, f"services missing: {sorted(expected - set(services))}")
    if not expected <= set(services):
        return

    # Every image pinned; every published port on loopback only; every bind mount present.
    for name, service in services.items():
        image = service.get("image", "")
        failures.check(
            re.search(r":[^/]+$", image) and not image.endswith(":latest"),
            f"{where} {name}",
            f"image {image!r} must be pinned to a tag",
        )
        for ip, host, _ in published(service):
            failures.check(ip == "127.0.0.1", f"{where} {name}", f"port {host} must be published on 127.0.0.1 only")
        for target, source in bind_mounts(service).items():
            if OBSERVABILITY in source.parents or source == OBSERVABILITY:
                continue  # checked below, with what uses them
            failures.check(source.exists(), f"{where} {name}", f"bind mount {source} -> {target}: no such path")

    redis, postgres = services["redis"], services["postgres"]
    failures.check(redis["image"].startswith("redis:7"), where, "Redis must be 7.x")
    failures.check(postgres["image"].startswith("postgres:16"), where, "PostgreSQL must be 16.x")
    for name in ("redis", "postgres"):
        failures.check(services[name].get("healthcheck", {}).get("test"), f"{where} {name}", "needs a healthcheck")
    pg_env = env_of(postgres)

    # The replicas: one image, the same settings, Redis and PostgreSQL healthy first.
    replicas = {name: services[name] for name in REPLICAS}
    first = replicas[REPLICAS[0]]
    replica_env = env_of(first)
    for name, service in replicas.items():
        w = f"{where} {name}"
        failures.check(
            Path(service.get("build", {}).get("context", "")) == ROOT,
            w,
            "must be built from the repository's Dockerfile (build: .)",
        )
        failures.check(service.get("image") == first.get("image"), w, "all replicas must share one image")
        failures.check(env_of(service) == replica_env, w, "all replicas must have the same environment")
        failures.check(not service.get("ports"), w, "replicas are reached through the balancer only")
        depends = service.get("depends_on", {})
        for dependency in ("redis", "postgres"):
            failures.check(
                isinstance(depends, dict) and depends.get(dependency, {}).get("condition") == "service_healthy",
                w,
                f"depends_on {dependency} must wait for condition: service_healthy",
            )
        grace = seconds(service.get("stop_grace_period", "10s"))
        drain = seconds(env_of(service).get("FANOUT_SHUTDOWN_TIMEOUT", "10s"))
        failures.check(grace > drain, w, f"stop_grace_period ({grace}s) must exceed FANOUT_SHUTDOWN_TIMEOUT ({drain}s)")
    failures.check(replica_env.get("REDIS_URL", "").startswith("redis://redis:"), where, "REDIS_URL must point at service redis")
    database_url = replica_env.get("DATABASE_URL", "")
    failures.check(
        database_url
        == f"postgres://{pg_env.get('POSTGRES_USER')}:{pg_env.get('POSTGRES_PASSWORD')}@postgres:5432/{pg_env.get('POSTGRES_DB')}",
        where,
        "DATABASE_URL must match service postgres's user, password and database",
    )
    for key in ("JWT_SECRET", "FANOUT_INGEST_KEYS"):
        failures.check(replica_env.get(key), where, f"replicas need {key} (without it they run in dev mode, each with its own random secret)")

    # HAProxy: the repository's config, naming exactly these replicas.
    haproxy = services["haproxy"]
    cfg_path = host_path(bind_mounts(haproxy), "/usr/local/etc/haproxy/haproxy.cfg")
    if failures.check(cfg_path == COMPOSE / "haproxy.cfg", f"{where} haproxy", "must mount examples/compose/haproxy.cfg as its configuration"):
        check_haproxy(haproxy_sections(cfg_path.read_text()), haproxy, failures)

    # Prometheus: each replica's /metrics, and the project's alert rules.
    prometheus = services["prometheus"]
    mounts = bind_mounts(prometheus)
    prom_path = host_path(mounts, "/etc/prometheus/prometheus.yml")
    if failures.check(prom_path == COMPOSE / "prometheus.yml", f"{where} prometheus", "must mount examples/compose/prometheus.yml"):
        prom = yaml.safe_load(prom_path.read_text())
        jobs = {j["job_name"]: j for j in prom.get("scrape_configs", [])}
        targets = [t for j in jobs.values() for c in j.get("static_configs", []) for t in c.get("targets", [])]
        failures.check(
            {f"{r}:{INTERNAL_PORT}" for r in REPLICAS} <= set(targets),
            "examples/compose/prometheus.yml",
            f"must scrape every replica on its internal port ({INTERNAL_PORT})",
        )
        rules = [host_path(mounts, r) for r in prom.get("rule_files", [])]
        failures.check(
            ALERTS in rules and ALERTS.exists(),
            "examples/compose/prometheus.yml",
            f"rule_files must load {ALERTS.relative_to(ROOT)} (through the compose mount)",
        )

    # Grafana: the provisioned data source and the project's dashboard.
    grafana = services["grafana"]
    mounts = bind_mounts(grafana)
    provisioning = host_path(mounts, "/etc/grafana/provisioning")
    if failures.check(provisioning == COMPOSE / "grafana" / "provisioning", f"{where} grafana", "must mount examples/compose/grafana/provisioning"):
        sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
        failures.check(
            any(s["type"] == "prometheus" and s["url"] == "http://prometheus:9090" and s.get("isDefault") for s in sources),
            "examples/compose/grafana",
            "the default data source must be the compose Prometheus",
        )
        providers = yaml.safe_load((provisioning / "dashboards" / "fanout.yaml").read_text())["providers"]
        paths = [host_path(mounts, p["options"]["path"]) for p in providers]
        failures.check(
            OBSERVABILITY / "grafana" in paths,
            "examples/compose/grafana",
            "a dashboard provider must load k8s/observability/grafana/ (through the compose mount)",
        )
        dashboard = OBSERVABILITY / "grafana" / "fanout-dashboard.json"
        home = host_path(mounts, env_of(grafana).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH", ""))
        failures.check(home == dashboard, f"{where} grafana", "the home dashboard must be k8s/observability/grafana/fanout-dashboard.json")
        if dashboard.exists():
            json.loads(dashboard.read_text())
        else:
            pending("k8s/observability/grafana/fanout-dashboard.json does not exist (yet): Grafana would show no dashboard")

    # The worker simulator: the replicas' keys, HAProxy's ingest frontend, the dashboard's files.
    sim = services["worker-sim"]
    sim_env = env_of(sim)
    w = f"{where} worker-sim"
    failures.check(host_path(bind_mounts(sim), "/sim/sim.py") == COMPOSE / "worker-sim" / "sim.py", w, "must run examples/compose/worker-sim/sim.py")
    failures.check(sim_env.get("INGEST_KEY") in replica_env.get("FANOUT_INGEST_KEYS", "").split(","), w, "INGEST_KEY must be one of the replicas' FANOUT_INGEST_KEYS")
    failures.check(sim_env.get("JWT_SECRET") == replica_env.get("JWT_SECRET"), w, "JWT_SECRET must be the replicas' (it mints the demo's tokens)")
    failures.check(sim_env.get("INGEST_URL") == f"http://haproxy:{INTERNAL_PORT}", w, "must publish through HAProxy's ingest frontend")
    demo_port = int(sim_env.get("DEMO_LISTEN", ":0").rpartition(":")[2])
    failures.check(any(c == demo_port for _, _, c in published(sim)), w, "must publish its port (the demo's tokens)")
    haproxy_host = {c: h for _, h, c in published(haproxy)}
    public_url = f"http://localhost:{haproxy_host.get(PUBLIC_PORT)}"
    failures.check(sim_env.get("PUBLIC_URL") == public_url, w, "PUBLIC_URL must be HAProxy's public port as published on the host")
    # The dashboard: examples/dashboard/ as the simulator serves it, behind HAProxy's
    # /dashboard/ on fanout's public origin (same origin: no CORS, the affinity cookie sent).
    dashboard_dir = host_path(bind_mounts(sim), sim_env.get("DASHBOARD_DIR", "/nowhere"))
    failures.check(dashboard_dir == DASHBOARD, w, "DASHBOARD_DIR must be examples/dashboard/, mounted")
    failures.check((DASHBOARD / "index.html").is_file(), "examples/dashboard", "index.html is missing")
    if cfg_path == COMPOSE / "haproxy.cfg":
        check_dashboard_route(haproxy_sections(cfg_path.read_text()), demo_port, failures)
    origins = replica_env.get("FANOUT_CORS_ORIGINS", "*").split(",")
    failures.check(
        origins == ["*"] or public_url in origins,
        where,
        f"FANOUT_CORS_ORIGINS must be * or list the dashboard's origin {public_url}",
    )


def check_dashboard_route(sections: dict[str, list[list[str]]], demo_port: int, failures: Failures) -> None:
    """HAProxy's public frontend sends /dashboard/ to the simulator's web server, and only that."""
    where = "examples/compose/haproxy.cfg"
    public = next((v for k, v in sections.items() if k.startswith(("frontend ", "listen ")) and [f":{PUBLIC_PORT}"] in directives(v, "bind")), [])
    failures.check(
        ["dashboard", "if", "{", "path_beg", "/dashboard/", "}"] in directives(public, "use_backend"),
        where,
        "the public frontend must route /dashboard/ (use_backend dashboard if { path_beg /dashboard/ })",
    )
    failures.check(directives(public, "default_backend") == [["fanout"]], where, "the public frontend's default backend must be fanout")
    servers = [s[1] for s in directives(sections.get("backend dashboard", []), "server")]
    failures.check(
        servers == [f"worker-sim:{demo_port}"],
        where,
        f"backend dashboard must be the worker simulator's web server (worker-sim:{demo_port}), not {servers}",
    )


def check_haproxy(sections: dict[str, list[list[str]]], service: dict, failures: Failures) -> None:
    where = "examples/compose/haproxy.cfg"
    frontends = {k.split()[1]: v for k, v in sections.items() if k.startswith(("frontend ", "listen "))}
    backends = {k.split()[1]: v for k, v in sections.items() if k.startswith("backend ")}
    defaults = sections.get("defaults", [])

    def backend_servers(name: str) -> dict[str, list[str]]:
        return {s[0]: s[1:] for s in directives(backends.get(name, []), "server")}

    # Which backend each bound port reaches.
    routes: dict[int, set[str]] = {}
    for name, lines in frontends.items():
        ports = {int(b[0].rpartition(":")[2]) for b in directives(lines, "bind")}
        used = {b[0] for b in directives(lines, "default_backend") + directives(lines, "use_backend")}
        for port in ports:
            routes[port] = used
    public_backends = routes.get(PUBLIC_PORT, set())
    failures.check(
        public_backends == {"fanout", "dashboard"},
        where,
        f"port {PUBLIC_PORT} must route to backends fanout and dashboard (the page's files) only, not {public_backends}",
    )

    # The public backend: the replicas' public port, sticky, checked on /readyz.
    fanout = backends.get("fanout", [])
    servers = backend_servers("fanout")
    failures.check(sorted(servers) == REPLICAS, where, f"backend fanout must list exactly the compose replicas {REPLICAS}")
    for name, words in servers.items():
        failures.check(words[0] == f"{name}:{PUBLIC_PORT}", where, f"server {name} must be {name}:{PUBLIC_PORT} (the public port)")
        text = " ".join(words)
        failures.check(f"check port {INTERNAL_PORT}" in text, where, f"server {name} must be checked on the internal port ({INTERNAL_PORT})")
        failures.check(f"cookie {name}" in text, where, f"server {name} needs its cookie value")
    cookie = directives(fanout, "cookie")
    failures.check(
        cookie and cookie[0][:2] == ["SERVERID", "insert"] and {"indirect", "nocache"} <= set(cookie[0]),
        where,
        "backend fanout needs `cookie SERVERID insert indirect nocache` (sticky long-polling)",
    )
    failures.check(["httpchk", "GET", "/readyz"] in directives(fanout, "option"), where, "backend fanout must check GET /readyz")
    failures.check(["expect", "status", "200"] in directives(fanout, "http-check"), where, "health checks must expect 200 (503 while draining)")
    failures.check(["redispatch"] in [o[:1] for o in directives(defaults, "option")], where, "option redispatch: a dead replica's cookie must not strand its clients")

    # Nothing but the ingest frontend reaches the internal port, and only ingest routes.
    for backend, lines in backends.items():
        ports = {s[1].rpartition(":")[2] for s in directives(lines, "server")}
        if str(INTERNAL_PORT) in ports:
            reached_from = [p for p, used in routes.items() if backend in used]
            failures.check(reached_from and PUBLIC_PORT not in reached_from, where, f"backend {backend} (internal port) must not be reachable from port {PUBLIC_PORT}")
            failures.check(sorted(backend_servers(backend)) == REPLICAS, where, f"backend {backend} must list exactly the compose replicas")

    # Timeouts: above the Engine.IO ping (a long-poll is held up to the interval; a
    # WebSocket is silent for up to interval + timeout).
    timeouts = {t[0]: seconds(t[1], "ms") for t in directives(defaults, "timeout")}
    failures.check(timeouts.get("tunnel", 0) > PING_INTERVAL + PING_TIMEOUT, where, f"timeout tunnel must exceed {PING_INTERVAL + PING_TIMEOUT}s")
    for side in ("client", "server"):
        failures.check(timeouts.get(side, 0) > PING_INTERVAL, where, f"timeout {side} must exceed the ping interval ({PING_INTERVAL}s): a long-poll is held that long")

    # What HAProxy binds is what compose publishes.
    bound = set(routes)
    targets = {c for _, _, c in published(service)}
    failures.check(bound == targets, "docker-compose.yml haproxy", f"publishes {sorted(targets)} but haproxy.cfg binds {sorted(bound)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("compose_config", help="output of `docker-compose config` for docker-compose.yml")
    parser.add_argument("--probe", type=Path, required=True, help="busybox-static's busybox binary (the image's HEALTHCHECK probe)")
    parser.add_argument("--fanout", type=Path, required=True, help="a fanout binary to probe")
    args = parser.parse_args()
    failures = Failures()

    step("Dockerfile: stages, base images, user, ports, entrypoint, HEALTHCHECK")
    _, stages = parse_dockerfile((ROOT / "Dockerfile").read_text())
    sources, probe = check_dockerfile(stages, failures)

    step(".dockerignore: the build context is what the Dockerfile copies")
    count = check_context(sources, failures)
    print(f"    {count} tracked files in the build context")

    if probe:
        step(f"HEALTHCHECK probe against a running replica: {probe}")
        # The image names busybox `wget`: busybox picks its applet from that name.
        linked = args.probe.parent / "probe" / PurePosixPath(shlex.split(probe)[0]).name
        linked.parent.mkdir(exist_ok=True)
        if not linked.exists():
            linked.symlink_to(args.probe.resolve())
        check_probe(probe, linked, args.fanout, failures)

    step("docker-compose.yml with examples/compose/ (HAProxy, Prometheus, Grafana, worker simulator)")
    check_compose(yaml.safe_load(Path(args.compose_config).read_text()), failures)

    return failures.report()


if __name__ == "__main__":
    sys.exit(main())
