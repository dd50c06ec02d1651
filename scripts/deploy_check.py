#!/usr/bin/env python3
"""Checks of the deployment manifests (helm/fanout/ and k8s/); run by scripts/test-deploy.

The chart is the source: k8s/base/ and k8s/observability/prometheusrule.yaml are its
rendering (scripts/render-k8s, whose --check keeps them current), so the two cannot
disagree. Given the output of `kubectl kustomize` for the base and every overlay, this:

1. validates every object against the Kubernetes OpenAPI schemas (kubernetes-validate,
   strict: unknown fields are errors) of the oldest supported Kubernetes version (the
   chart's kubeVersion) and of the newest one the validator knows; the ServiceMonitor and
   the PrometheusRule, CRDs, against the subset of their schemas that we use;
2. checks the rules the manifests exist to keep (probes on the internal port, shutdown
   timings that add up, the Ingress never reaching the internal port, proxy timeouts above
   the Engine.IO ping, NetworkPolicy ports, the PrometheusRule carrying exactly
   helm/fanout/files/alerts.yaml's rules, ...) on the kustomize output, overlays included,
   and on the chart rendered with every ci/*-values.yaml (the defaults among them);
3. lints and renders the chart with Helm's own Go SDK (the helm-python-sdk wheel: no helm
   binary needed), validates what it renders, and checks the chart's negative paths
   (missing secrets, a conflicting setting);
4. checks the chart statically: every `.Values.x` a template reads exists in values.yaml,
   every value is read by a template, and every value is documented in the chart README
   (and nothing else is).
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import kubernetes_validate.utils
import yaml

from checks import Failures, step
from render_k8s import render

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "fanout"
K8S = ROOT / "k8s"
# The alert rules: a plain Prometheus rules file, which the chart's PrometheusRule carries.
ALERTS = CHART / "files" / "alerts.yaml"

# Names of the ports, as every rendering must define them.
PUBLIC_PORT = ("http", 3000)
INTERNAL_PORT = ("internal", 3001)

# Kinds the overlays add to k8s/base: the PrometheusRule of k8s/observability/.
OVERLAY_ONLY = {"PrometheusRule"}


def load_docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def dig(obj: Any, *path: Any, default: Any = None) -> Any:
    for key in path:
        if isinstance(obj, dict) and key in obj:
            obj = obj[key]
        elif isinstance(obj, list) and isinstance(key, int) and -len(obj) <= key < len(obj):
            obj = obj[key]
        else:
            return default
    return obj


def seconds(duration: str) -> float:
    """A Go/Prometheus-style duration ("25s", "1m30s", "500ms") in seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", duration)
    if not parts or "".join(n + u for n, u in parts) != duration:
        raise ValueError(f"not a duration: {duration!r}")
    return sum(float(n) * units[u] for n, u in parts)


# --- 1. schemas -------------------------------------------------------------------------

_DURATION = (
    r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
)
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": _STRING_MAP,
        "matchExpressions": {"type": "array", "items": {"type": "object"}},
    },
}
# The fields of monitoring.coreos.com/v1 ServiceMonitor this project may use, with the
# types and patterns of the Prometheus Operator's CRD; anything else is rejected, so a
# typo cannot pass as an unknown-but-allowed field.
SERVICEMONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "additionalProperties": False,
            "properties": {
                "name": {"type": "string"},
                "namespace": {"type": "string"},
                "labels": _STRING_MAP,
                "annotations": _STRING_MAP,
            },
        },
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": _LABEL_SELECTOR,
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "any": {"type": "boolean"},
                        "matchNames": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "jobLabel": {"type": "string"},
                "targetLabels": {"type": "array", "items": {"type": "string"}},
                "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                "sampleLimit": {"type": "integer", "minimum": 0},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "targetPort": {"type": ["integer", "string"]},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                            "interval": {"type": "string", "pattern": _DURATION},
                            "scrapeTimeout": {"type": "string", "pattern": _DURATION},
                            "honorLabels": {"type": "boolean"},
                            "relabelings": {"type": "array", "items": {"type": "object"}},
                            "metricRelabelings": {"type": "array", "items": {"type": "object"}},
                        },
                    },
                },
            },
        },
    },
}


_RULE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["expr"],
    "properties": {
        "record": {"type": "string", "pattern": "^[a-zA-Z_:][a-zA-Z0-9_:]*$"},
        "alert": {"type": "string", "minLength": 1},
        "expr": {"type": ["string", "integer"]},
        "for": {"type": "string", "pattern": _DURATION},
        "keep_firing_for": {"type": "string", "pattern": _DURATION},
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
    },
    # Exactly one of record and alert; annotations and `for` only on alerts.
    "oneOf": [
        {
            "required": ["record"],
            "not": {"anyOf": [{"required": [k]} for k in ("alert", "annotations", "for")]},
        },
        {"required": ["alert"], "not": {"required": ["record"]}},
    ],
}
# The fields of monitoring.coreos.com/v1 PrometheusRule this project may use (rule groups
# as in a Prometheus rules file), with the types and patterns of the Prometheus Operator's
# CRD; anything else is rejected.
PROMETHEUSRULE_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": SERVICEMONITOR_SCHEMA["properties"]["metadata"],
        "spec": {
            "type": "object",
            "required": ["groups"],
            "additionalProperties": False,
            "properties": {
                "groups": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name", "rules"],
                        "additionalProperties": False,
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "interval": {"type": "string", "pattern": _DURATION},
                            "limit": {"type": "integer", "minimum": 0},
                            "rules": {"type": "array", "items": _RULE},
                        },
                    },
                },
            },
        },
    },
}
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICEMONITOR_SCHEMA,
    ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUSRULE_SCHEMA,
}


def min_kubernetes_version() -> str:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    match = re.match(r"^>=\s*(\d+\.\d+)", chart.get("kubeVersion", ""))
    if not match:
        raise SystemExit("helm/fanout/Chart.yaml: kubeVersion must read '>=1.N.0-0'")
    return match.group(1)


def validate_schemas(name: str, docs: list[dict], versions: list[str], failures: Failures) -> None:
    for doc in docs:
        where = f"{name}: {doc.get('kind')}/{dig(doc, 'metadata', 'name')}"
        schema = CRD_SCHEMAS.get((doc.get("apiVersion"), doc.get("kind")))
        if schema is not None:
            for error in jsonschema.Draft202012Validator(schema).iter_errors(doc):
                failures.add(where, f"{'.'.join(map(str, error.absolute_path))}: {error.message}")
            continue
        for version in versions:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.utils.SchemaNotFoundError as e:
                failures.add(where, e.message)
            except kubernetes_validate.utils.ValidationError as e:
                path = ".".join(map(str, e.absolute_path))
                failures.add(where, f"Kubernetes {version} schema: {path}: {e.message}")


def validator_self_test(docs: list[dict], versions: list[str]) -> None:
    """The validators must reject an unknown field: otherwise the checks above prove nothing."""
    deployment = copy.deepcopy(next(d for d in docs if d["kind"] == "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    probe = Failures()
    validate_schemas("self-test", [deployment], versions, probe)
    if len(probe.messages) != len(versions):
        raise SystemExit(
            "kubernetes-validate accepted an unknown field: strict validation is not working"
        )
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "self-test"},
        "spec": {"groups": [{"name": "g", "rules": [{"alert": "A", "expr": "1", "fro": "5m"}]}]},
    }
    probe = Failures()
    validate_schemas("self-test", [rule], versions, probe)
    if not probe.messages:
        raise SystemExit("the PrometheusRule schema accepted an unknown field")


# --- 2. the rules -----------------------------------------------------------------------


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind]


def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def check_rules(name: str, docs: list[dict], required: set[str], failures: Failures) -> None:
    kinds = {d["kind"] for d in docs}
    for kind in sorted(required - kinds):
        failures.add(name, f"no {kind}")
    deployments = by_kind(docs, "Deployment")
    if not failures.check(len(deployments) == 1, name, "expected exactly one Deployment"):
        return
    deploy = deployments[0]
    w = f"{name}: Deployment"
    pod = deploy["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    spec = pod["spec"]
    failures.check(
        matches(deploy["spec"]["selector"], pod_labels), w, "selector does not match the pod labels"
    )
    containers = spec["containers"]
    if not failures.check(len(containers) == 1, w, "expected one container"):
        return
    c = containers[0]
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    for port_name, number in (PUBLIC_PORT, INTERNAL_PORT):
        failures.check(
            ports.get(port_name) == number,
            w,
            f"container port {port_name} must be {number} (fanout's default listener), got {ports.get(port_name)}",
        )
    failures.check(
        c.get("command", [None])[0] == "/usr/local/bin/fanout",
        w,
        "command must start the fanout binary",
    )

    # Probes: liveness and startup on /healthz, readiness on /readyz, all on the internal port.
    for probe, path in (
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ):
        get = dig(c, probe, "httpGet") or {}
        port = get.get("port")
        failures.check(
            get.get("path") == path, w, f"{probe} must GET {path}, got {get.get('path')}"
        )
        failures.check(port in INTERNAL_PORT, w, f"{probe} must use the internal port, got {port}")

    # Shutdown: preStop sleep, then FANOUT_SHUTDOWN_TIMEOUT, within the grace period.
    config = {}
    for source in c.get("envFrom", []):
        ref = dig(source, "configMapRef", "name")
        for cm in by_kind(docs, "ConfigMap"):
            if ref and cm["metadata"]["name"] == ref:
                config.update(cm.get("data", {}))
    env = {e["name"]: e for e in c.get("env", [])}
    failures.check(
        "FANOUT_SHUTDOWN_TIMEOUT" not in env,
        w,
        "set FANOUT_SHUTDOWN_TIMEOUT in the ConfigMap, where the checks read it",
    )
    shutdown = seconds(config.get("FANOUT_SHUTDOWN_TIMEOUT", "10s"))
    sleep = dig(c, "lifecycle", "preStop", "sleep", "seconds")
    grace = spec.get("terminationGracePeriodSeconds", 30)
    if failures.check(
        isinstance(sleep, int) and sleep >= 3,
        w,
        f"preStop must be a sleep action of at least 3 s (endpoint removal), got {dig(c, 'lifecycle', 'preStop')}",
    ):
        failures.check(
            grace >= sleep + shutdown + 2,
            w,
            f"terminationGracePeriodSeconds {grace} < preStop sleep {sleep} + FANOUT_SHUTDOWN_TIMEOUT {shutdown:g} + 2 s margin",
        )

    # Configuration: the ConfigMap and the Secret, the required keys by name, Redis set.
    env_from = c.get("envFrom", [])
    secret_names = [dig(s, "secretRef", "name") for s in env_from if "secretRef" in s]
    failures.check(
        bool(env_from) and "configMapRef" in env_from[0],
        w,
        "envFrom must start with the ConfigMap, so the Secret's keys win",
    )
    failures.check(len(secret_names) >= 1, w, "envFrom must include the Secret")

    def required_secret(key: str) -> bool:
        ref = dig(env.get(key, {}), "valueFrom", "secretKeyRef") or {}
        return ref.get("key") == key and ref.get("name") in secret_names and not ref.get("optional")

    failures.check(
        required_secret("JWT_SECRET") or required_secret("JWT_PUBLIC_KEY"),
        w,
        "JWT_SECRET (or JWT_PUBLIC_KEY) must be a required secretKeyRef: no dev mode on a missing key",
    )
    # Or the keys come from a file mounted from a Secret (ingestKeysFile), whose volume
    # cannot be missing either: a pod without its Secret does not start.
    keys_file = env.get("FANOUT_INGEST_KEYS_FILE", {}).get("value", "")
    mounts = [m.get("mountPath", "") for m in c.get("volumeMounts", [])]
    failures.check(
        required_secret("FANOUT_INGEST_KEYS")
        or (bool(keys_file) and any(keys_file.startswith(m + "/") for m in mounts)),
        w,
        "FANOUT_INGEST_KEYS must be a required secretKeyRef (or FANOUT_INGEST_KEYS_FILE a file in a mounted Secret)",
    )
    buses = [key for key in ("REDIS_URL", "REDIS_SENTINEL_URLS", "REDIS_CLUSTER_URLS") if config.get(key)]
    failures.check(
        len(buses) == 1,
        w,
        "exactly one of REDIS_URL, REDIS_SENTINEL_URLS, REDIS_CLUSTER_URLS must be set in the ConfigMap "
        f"(set: {buses or 'none'}): replicas without a shared bus do not see each other's messages",
    )
    failures.check(
        not config.get("REDIS_SENTINEL_URLS") or bool(config.get("REDIS_SENTINEL_MASTER")),
        w,
        "REDIS_SENTINEL_URLS needs REDIS_SENTINEL_MASTER",
    )
    failures.check(
        spec.get("enableServiceLinks") is False,
        w,
        "enableServiceLinks must be false (FANOUT_* service variables)",
    )
    failures.check(
        spec.get("automountServiceAccountToken") is False,
        w,
        "automountServiceAccountToken must be false",
    )

    # Security context.
    psc, csc = spec.get("securityContext", {}), c.get("securityContext", {})
    failures.check(
        psc.get("runAsNonRoot") is True or csc.get("runAsNonRoot") is True, w, "runAsNonRoot"
    )
    failures.check(csc.get("readOnlyRootFilesystem") is True, w, "readOnlyRootFilesystem")
    failures.check(
        csc.get("allowPrivilegeEscalation") is False, w, "allowPrivilegeEscalation: false"
    )
    failures.check("ALL" in (dig(csc, "capabilities", "drop") or []), w, "capabilities.drop: [ALL]")
    failures.check(
        "RuntimeDefault"
        in (dig(psc, "seccompProfile", "type"), dig(csc, "seccompProfile", "type")),
        w,
        "seccompProfile RuntimeDefault",
    )

    # Resources and placement.
    res = c.get("resources", {})
    for path in (("requests", "cpu"), ("requests", "memory"), ("limits", "memory")):
        failures.check(dig(res, *path) is not None, w, f"resources.{'.'.join(path)} must be set")
    keys = {
        t["topologyKey"]
        for t in spec.get("topologySpreadConstraints", [])
        if matches(t.get("labelSelector", {}), pod_labels)
    }
    failures.check(
        {"topology.kubernetes.io/zone", "kubernetes.io/hostname"} <= keys,
        w,
        "topologySpreadConstraints across zones and nodes",
    )
    failures.check(
        dig(deploy, "spec", "strategy", "rollingUpdate", "maxUnavailable") == 0,
        w,
        "rolling updates must not reduce capacity (maxUnavailable: 0)",
    )

    # Services: public → 3000, internal → 3001, both selecting the pods.
    services = {}
    for svc in by_kind(docs, "Service"):
        sw = f"{name}: Service/{svc['metadata']['name']}"
        failures.check(
            matches({"matchLabels": svc["spec"]["selector"]}, pod_labels),
            sw,
            "selector does not match the pods",
        )
        failures.check(
            svc["spec"].get("type", "ClusterIP") == "ClusterIP", sw, "must be a ClusterIP Service"
        )
        for p in svc["spec"]["ports"]:
            target = p.get("targetPort", p["port"])
            services[(svc["metadata"]["name"], p["name"])] = ports.get(target, target)
            services[(svc["metadata"]["name"], p["port"])] = ports.get(target, target)
    internal_services = {svc for (svc, _), port in services.items() if port == INTERNAL_PORT[1]}
    failures.check(bool(internal_services), name, "no Service for the internal port")
    failures.check(
        any(port == PUBLIC_PORT[1] for port in services.values()),
        name,
        "no Service for the public port",
    )

    # Ingress: only the public port; stickiness; timeouts above ping interval + timeout.
    ping = seconds(config.get("FANOUT_PING_INTERVAL", "25s")) + seconds(
        config.get("FANOUT_PING_TIMEOUT", "20s")
    )
    for ing in by_kind(docs, "Ingress"):
        iw = f"{name}: Ingress/{ing['metadata']['name']}"
        ann = ing["metadata"].get("annotations", {})
        failures.check(
            bool(ing["spec"].get("ingressClassName")),
            iw,
            "ingressClassName must name the ingress-nginx class (the annotations are ingress-nginx's)",
        )
        failures.check(
            ann.get("nginx.ingress.kubernetes.io/affinity") == "cookie",
            iw,
            "cookie affinity is required for long-polling",
        )
        failures.check(
            ann.get("nginx.ingress.kubernetes.io/affinity-mode") == "persistent",
            iw,
            "affinity-mode must be persistent (balanced moves live sessions)",
        )
        failures.check(
            "nginx.ingress.kubernetes.io/upstream-hash-by" not in ann,
            iw,
            "upstream-hash-by conflicts with the cookie affinity",
        )
        for key in ("proxy-read-timeout", "proxy-send-timeout"):
            value = ann.get(f"nginx.ingress.kubernetes.io/{key}")
            failures.check(
                value is not None and float(value) > ping,
                iw,
                f"{key} ({value}) must exceed FANOUT_PING_INTERVAL + FANOUT_PING_TIMEOUT ({ping:g} s)",
            )
        backends = [
            dig(p, "backend", "service")
            for r in ing["spec"].get("rules", [])
            for p in dig(r, "http", "paths", default=[])
        ]
        failures.check(bool(backends), iw, "no backends")
        for b in backends:
            port = b["port"].get("name", b["port"].get("number"))
            target = services.get((b["name"], port))
            failures.check(
                target == PUBLIC_PORT[1],
                iw,
                f"backend {b['name']}:{port} must reach the public port {PUBLIC_PORT[1]}, reaches {target}",
            )
            failures.check(
                b["name"] not in internal_services,
                iw,
                f"backend {b['name']} is the internal Service",
            )

    # HPA: CPU, scale-down stabilized; then the Deployment must not set replicas.
    for hpa in by_kind(docs, "HorizontalPodAutoscaler"):
        hw = f"{name}: HorizontalPodAutoscaler/{hpa['metadata']['name']}"
        failures.check(hpa["apiVersion"] == "autoscaling/v2", hw, "must be autoscaling/v2")
        failures.check(
            dig(hpa, "spec", "scaleTargetRef", "name") == deploy["metadata"]["name"],
            hw,
            "must target the Deployment",
        )
        failures.check(
            any(dig(m, "resource", "name") == "cpu" for m in hpa["spec"].get("metrics", [])),
            hw,
            "must scale on CPU",
        )
        failures.check(
            (dig(hpa, "spec", "behavior", "scaleDown", "stabilizationWindowSeconds") or 0) >= 300,
            hw,
            "scale-down stabilization must be at least 300 s (long-lived connections)",
        )
        failures.check(hpa["spec"].get("minReplicas", 1) >= 2, hw, "minReplicas must be at least 2")
        failures.check(
            "replicas" not in deploy["spec"], w, "must not set replicas: the HPA owns them"
        )

    for pdb in by_kind(docs, "PodDisruptionBudget"):
        pw = f"{name}: PodDisruptionBudget/{pdb['metadata']['name']}"
        failures.check(
            matches(pdb["spec"]["selector"], pod_labels), pw, "selector does not match the pods"
        )
        failures.check(
            pdb["spec"].get("maxUnavailable") == 1 or "minAvailable" in pdb["spec"],
            pw,
            "maxUnavailable 1 (or minAvailable)",
        )

    # NetworkPolicy: 3000 from the ingress controller's namespace only; 3001 never from it.
    for np in by_kind(docs, "NetworkPolicy"):
        nw = f"{name}: NetworkPolicy/{np['metadata']['name']}"
        failures.check(
            matches(np["spec"]["podSelector"], pod_labels),
            nw,
            "podSelector does not match the pods",
        )
        failures.check(
            "Ingress" in np["spec"].get("policyTypes", []), nw, "policyTypes must include Ingress"
        )
        rules = np["spec"].get("ingress", [])
        for rule in rules:
            failures.check(
                bool(rule.get("from")) and bool(rule.get("ports")),
                nw,
                "every rule must name its peers and ports (an empty one admits everything)",
            )
        by_port: dict[int, list[dict]] = {}
        for rule in rules:
            for p in rule.get("ports", []):
                by_port.setdefault(ports.get(p.get("port"), p.get("port")), []).extend(
                    rule.get("from", [])
                )
        failures.check(
            set(by_port) == {PUBLIC_PORT[1], INTERNAL_PORT[1]},
            nw,
            f"must admit exactly ports 3000 and 3001, admits {sorted(by_port)}",
        )
        public_peers = by_port.get(PUBLIC_PORT[1], [])
        failures.check(
            all("namespaceSelector" in p and "podSelector" not in p for p in public_peers),
            nw,
            "port 3000 must be open to the ingress controller's namespace only",
        )
        internal_peers = by_port.get(INTERNAL_PORT[1], [])
        failures.check(
            not any(p in public_peers for p in internal_peers),
            nw,
            "port 3001 must not be open to the ingress controller",
        )
        failures.check(
            any("podSelector" in p for p in internal_peers),
            nw,
            "port 3001 must admit the workers (podSelector)",
        )

    # ServiceMonitor: the internal Service's port, /metrics.
    for sm in by_kind(docs, "ServiceMonitor"):
        sw = f"{name}: ServiceMonitor/{sm['metadata']['name']}"
        selected = [
            s
            for s in by_kind(docs, "Service")
            if matches(sm["spec"]["selector"], s["metadata"].get("labels", {}))
        ]
        failures.check(
            [s["metadata"]["name"] for s in selected] == sorted(internal_services),
            sw,
            f"must select exactly the internal Service, selects {[s['metadata']['name'] for s in selected]}",
        )
        for ep in sm["spec"]["endpoints"]:
            target = [services.get((s["metadata"]["name"], ep.get("port"))) for s in selected]
            failures.check(
                target == [INTERNAL_PORT[1]] * len(selected),
                sw,
                f"endpoint port {ep.get('port')} must be the internal port",
            )
            failures.check(ep.get("path") == "/metrics", sw, "endpoint path must be /metrics")
            if "interval" in ep and "scrapeTimeout" in ep:
                failures.check(
                    seconds(ep["scrapeTimeout"]) <= seconds(ep["interval"]),
                    sw,
                    "scrapeTimeout must not exceed interval",
                )

    # PrometheusRule: exactly the rules of helm/fanout/files/alerts.yaml, which promtool
    # tests and plain Prometheus setups (docker-compose) load as is.
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    for rule in by_kind(docs, "PrometheusRule"):
        rw = f"{name}: PrometheusRule/{rule['metadata']['name']}"
        failures.check(
            dig(rule, "spec", "groups") == groups,
            rw,
            f"spec.groups must equal the groups of {ALERTS.relative_to(ROOT)}",
        )


# --- 3. the chart -----------------------------------------------------------------------


def render_chart(values: dict) -> tuple[list[dict], str]:
    docs, notes = [], ""
    for path, text in sorted(render(values).items()):
        if path.endswith("NOTES.txt"):
            notes = text
        elif path.endswith((".yaml", ".yml")):
            docs.extend(load_docs(text))
    return docs, notes


def lint_chart(values: dict, where: str, failures: Failures) -> None:
    import helm_python

    report = helm_python.lint(CHART, values, strict=True)
    for error in report.get("errors", []):
        failures.add(where, f"helm lint: {error}")
    for m in report.get("messages", []):
        # 1 = info (e.g. "icon is recommended"); warnings and errors fail.
        if m.get("severity", 0) >= 2:
            failures.add(where, f"helm lint: {m.get('path')}: {m.get('error')}")


def render_must_fail(values: dict, expected: str, where: str, failures: Failures) -> None:
    try:
        render_chart(values)
    except Exception as e:  # helm_python.HelmRenderError and friends
        failures.check(expected in str(e), where, f"failed, but not with {expected!r}: {e}")
        return
    failures.add(where, f"rendered, but must fail with {expected!r}")


# --- 4. the chart, statically -----------------------------------------------------------

VALUES_REF = re.compile(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)")


def value_paths(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else key
            out.append((path, value))
            out.extend(value_paths(value, path))
    return out


def check_chart_statically(failures: Failures) -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    paths = dict(value_paths(values))
    refs: set[str] = set()
    for template in sorted((CHART / "templates").iterdir()):
        text = template.read_text()
        for match in VALUES_REF.finditer(text):
            ref = match.group(1)[1:]
            refs.add(ref)
            failures.check(
                ref in paths,
                f"helm/fanout/templates/{template.name}",
                f".Values.{ref} is not in values.yaml",
            )

    # Every value is read by some template (directly, or through a parent or child path).
    for path, value in paths.items():
        if isinstance(value, dict) and value:
            continue
        used = any(path == r or path.startswith(r + ".") or r.startswith(path + ".") for r in refs)
        failures.check(used, "helm/fanout/values.yaml", f"{path} is read by no template")

    # Every value is documented in the chart README's tables (a documented map covers its
    # keys), and every documented key exists.
    readme = (CHART / "README.md").read_text()
    documented = set(re.findall(r"^\|\s*`([^`]+)`\s*\|", readme, re.M))

    def covered(path: str) -> bool:
        parts = path.split(".")
        return any(".".join(parts[:i]) in documented for i in range(1, len(parts) + 1))

    for path, value in paths.items():
        if isinstance(value, dict) and value and path not in documented:
            continue  # its keys are checked one by one
        failures.check(covered(path), "helm/fanout/README.md", f"value {path} is not documented")
    for key in sorted(documented - set(paths)):
        failures.add("helm/fanout/README.md", f"documents {key}, which values.yaml does not have")

    # The chart's appVersion follows the crate's version.
    cargo = re.search(r'^version\s*=\s*"([^"]+)"', (ROOT / "Cargo.toml").read_text(), re.M)
    app_version = str(yaml.safe_load((CHART / "Chart.yaml").read_text()).get("appVersion"))
    failures.check(
        cargo is not None and app_version == cargo.group(1),
        "helm/fanout/Chart.yaml",
        f"appVersion {app_version} is not the crate's version {cargo and cargo.group(1)}",
    )


# --- main -------------------------------------------------------------------------------

# Every kind the manifests have, with the chart value that turns it on (None: always).
KIND_TOGGLES = {
    "ServiceAccount": "serviceAccount.create",
    "ConfigMap": None,
    "Deployment": None,
    "Service": None,
    "Ingress": "ingress.enabled",
    "HorizontalPodAutoscaler": "autoscaling.enabled",
    "PodDisruptionBudget": "podDisruptionBudget.enabled",
    "NetworkPolicy": "networkPolicy.enabled",
    "ServiceMonitor": "serviceMonitor.enabled",
    "PrometheusRule": "prometheusRule.enabled",
}
ALL_KINDS = set(KIND_TOGGLES)


def merge(base: Any, override: Any) -> Any:
    """Helm's coalescing of values: maps merge, anything else replaces."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            out[key] = merge(base.get(key), value) if key in base else value
        return out
    return override


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "rendered",
        nargs="+",
        metavar="DIR=FILE",
        help="a kustomization directory (relative to the repository) and the output of `kubectl kustomize` for it",
    )
    args = parser.parse_args()

    failures = Failures()
    versions = [
        min_kubernetes_version(),
        kubernetes_validate.utils.major_minor(kubernetes_validate.utils.latest_version()),
    ]

    step(
        f"kustomize output: schemas of Kubernetes {' and '.join(versions)} (strict), and the rules"
    )
    for item in args.rendered:
        directory, _, file = item.partition("=")
        docs = load_docs(Path(file).read_text())
        validate_schemas(directory, docs, versions, failures)
        overlay = directory.startswith("k8s/overlays/")
        check_rules(directory, docs, ALL_KINDS if overlay else ALL_KINDS - OVERLAY_ONLY, failures)
    validator_self_test(docs, versions)
    example = K8S / "secret.example.yaml"
    validate_schemas(
        str(example.relative_to(ROOT)), load_docs(example.read_text()), versions, failures
    )

    step("helm chart: lint (strict) and render with the Helm SDK, schemas, rules")
    chart_defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    ci_values = {
        p.stem: yaml.safe_load(p.read_text()) or {}
        for p in sorted((CHART / "ci").glob("*-values.yaml"))
    }
    for label, values in ci_values.items():
        where = f"helm/fanout with ci/{label}.yaml"
        lint_chart(values, where, failures)
        try:
            docs, notes = render_chart(values)
        except Exception as e:  # helm_python.HelmError: a template or the chart is broken
            failures.add(where, f"helm template: {e}")
            continue
        failures.check("fanout" in notes, where, "NOTES.txt rendered empty")
        validate_schemas(where, docs, versions, failures)
        merged = merge(chart_defaults, values)
        required = {
            kind
            for kind, toggle in KIND_TOGGLES.items()
            if toggle is None or dig(merged, *toggle.split("."))
        }
        check_rules(where, docs, required, failures)
    base = ci_values.get("default-values", {})
    render_must_fail(
        {**base, "secretEnv": {}},
        "secretEnv.JWT_SECRET is empty",
        "helm/fanout without secrets",
        failures,
    )
    render_must_fail(
        {**base, "config": {"FANOUT_SHUTDOWN_TIMEOUT": "30s"}},
        "set shutdown.timeoutSeconds instead",
        "helm/fanout with config.FANOUT_SHUTDOWN_TIMEOUT",
        failures,
    )
    render_must_fail(
        {**base, "config": {"REDIS_CLUSTER_URLS": "redis://node-0:6379"}},
        "config sets REDIS_URL and REDIS_CLUSTER_URLS: set only one bus",
        "helm/fanout with two buses",
        failures,
    )
    render_must_fail(
        {**base, "config": {"REDIS_URL": None}},
        "every replica must share one bus",
        "helm/fanout with no bus",
        failures,
    )
    render_must_fail(
        {**base, "config": {"REDIS_URL": None, "REDIS_SENTINEL_URLS": "redis://s:26379"}},
        "needs config.REDIS_SENTINEL_MASTER",
        "helm/fanout with sentinels and no master name",
        failures,
    )
    longer = {
        **base,
        "shutdown": {"timeoutSeconds": 40, "preStopSleepSeconds": 5, "extraGraceSeconds": 5},
    }
    try:
        docs, _ = render_chart(longer)
        check_rules("helm/fanout with shutdown.timeoutSeconds 40", docs, set(), failures)
    except Exception as e:
        failures.add("helm/fanout with shutdown.timeoutSeconds 40", f"helm template: {e}")

    step("helm chart: .Values references, unused values, README")
    check_chart_statically(failures)

    return failures.report()


if __name__ == "__main__":
    sys.exit(main())
