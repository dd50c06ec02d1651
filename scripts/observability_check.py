#!/usr/bin/env python3
"""Checks of the alert rules (helm/fanout/files/alerts.yaml, their one copy) and of the
Grafana dashboard (k8s/observability/grafana/); run by scripts/test-deploy, after
`promtool check rules` and `promtool test rules`.

1. The rules: every expression names only metrics that src/ops/metrics.rs defines (or
   Prometheus' own `up`); every alert has a `for`, a severity, a summary, a description and
   a `runbook` annotation naming its section of k8s/observability/README.md; every alert
   has a case where it fires and one where it stays quiet in
   k8s/observability/alerts.test.yaml, whose alert names must all exist (promtool passes a
   misspelt name that expects no alert). The PrometheusRule that carries them is the
   chart's; its rendering for kustomize is kept current by scripts/render-k8s --check.
2. grafana/fanout-dashboard.json: valid JSON, unique panel ids, panels that do not overlap,
   the templated Prometheus datasource on every panel and query, the job and instance
   filters on every selector, only metrics of metrics.rs, every metric of metrics.rs on
   some panel (or listed in NOT_GRAPHED with the reason), and every query accepted by
   promtool's parser.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from checks import Failures

ROOT = Path(__file__).resolve().parent.parent
METRICS_RS = ROOT / "src" / "ops" / "metrics.rs"
ALERTS = ROOT / "helm" / "fanout" / "files" / "alerts.yaml"
OBS = ROOT / "k8s" / "observability"
ALERTS_TEST = OBS / "alerts.test.yaml"
README = OBS / "README.md"
DASHBOARD = OBS / "grafana" / "fanout-dashboard.json"

# Series that Prometheus itself adds to every target, which the rules and panels may use.
PROMETHEUS_SERIES = {"up"}
# Metrics of metrics.rs that no panel shows, each with the reason. Empty: all are graphed.
NOT_GRAPHED: dict[str, str] = {}
SEVERITIES = {"warning", "critical"}
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}



def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# --- metric names -----------------------------------------------------------------------


def known_metrics() -> dict[str, str]:
    """Every series name fanout exports, mapped to its name in metrics.rs (a histogram's
    `_bucket`, `_sum` and `_count` map to the histogram)."""
    text = METRICS_RS.read_text()
    consts = dict(re.findall(r'pub const (\w+): &str = "([^"]+)";', text))
    if not consts:
        raise SystemExit(f"{rel(METRICS_RS)}: no `pub const NAME: &str = \"...\";` found")
    histograms = set(re.findall(r"describe_histogram!\(\s*(\w+)", text))
    if not histograms <= set(consts):
        unknown = sorted(histograms - set(consts))
        raise SystemExit(f"{rel(METRICS_RS)}: describe_histogram! of unknown {unknown}")
    names = {}
    for const, name in consts.items():
        if const in histograms:
            for suffix in ("_bucket", "_sum", "_count"):
                names[name + suffix] = name
        else:
            names[name] = name
    return names


# PromQL words that look like metric names but are not (functions are told apart by the
# parenthesis that follows them).
KEYWORDS = set(
    "and or unless by without on ignoring group_left group_right bool offset atan2 inf nan"
    " sum min max avg group stddev stdvar count count_values bottomk topk quantile".split()
)


def selectors(expr: str) -> list[tuple[str, str]]:
    """(metric name, label matchers) of every vector selector of a PromQL expression.

    A small scanner rather than a parser: string literals, range and subquery brackets,
    and `by (...)`-style label lists are blanked (keeping offsets), then every identifier
    that is not a keyword, a function or a number is a metric name, and the braces that
    follow it are its matchers.
    """

    def blank(match: re.Match) -> str:
        return " " * len(match.group(0))

    def placeholder(match: re.Match) -> str:
        return '"' + "_" * (len(match.group(0)) - 2) + '"'

    masked = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', placeholder, expr)
    masked = re.sub(r"\[[^\]]*\]", blank, masked)
    masked = re.sub(
        r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", blank, masked
    )
    braces = {m.start(): m for m in re.finditer(r"\{[^}]*\}", masked)}
    outside = re.sub(r"\{[^}]*\}", blank, masked)
    found = []
    for m in re.finditer(r"(?<![\w:.$])[A-Za-z_:][\w:]*", outside):
        name = m.group(0)
        rest = outside[m.end():].lstrip()
        if name in KEYWORDS or rest.startswith("("):
            continue
        after = m.end() + len(masked[m.end():]) - len(masked[m.end():].lstrip())
        matchers = expr[after : braces[after].end()] if after in braces else ""
        found.append((name, matchers))
    return found


def check_names(
    expr: str, where: str, known: dict[str, str], extra: set[str], failures: Failures
) -> list[tuple[str, str]]:
    found = selectors(expr)
    failures.check(bool(found), where, f"no metric found in {expr!r}")
    for name, _ in found:
        failures.check(
            name in known or name in PROMETHEUS_SERIES or name in extra,
            where,
            f"{name} is not a metric of {rel(METRICS_RS)}",
        )
    return found


# --- 1. alerts --------------------------------------------------------------------------


def rules_of(doc: dict) -> list[dict]:
    return [rule for group in doc.get("groups", []) for rule in group.get("rules", [])]


def check_alerts(known: dict[str, str], failures: Failures) -> None:
    doc = yaml.safe_load(ALERTS.read_text())
    rules = rules_of(doc)
    where = rel(ALERTS)
    recorded = {r["record"] for r in rules if "record" in r}
    alerts = [r for r in rules if "alert" in r]
    failures.check(bool(alerts), where, "no alerts")
    names = [a["alert"] for a in alerts]
    for name in sorted({n for n in names if names.count(n) > 1}):
        failures.add(where, f"{name} is defined more than once")

    readme = README.read_text()
    headings = re.findall(r"^### (Fanout\w+)\s*$", readme, re.M)
    for rule in rules:
        name = rule.get("alert") or rule.get("record")
        check_names(str(rule.get("expr", "")), f"{where}: {name}", known, recorded, failures)
    for alert in alerts:
        w = f"{where}: {alert['alert']}"
        failures.check(bool(alert.get("for")), w, "needs a `for:`")
        labels, annotations = alert.get("labels", {}), alert.get("annotations", {})
        failures.check(
            labels.get("severity") in SEVERITIES,
            w,
            f"severity must be one of {sorted(SEVERITIES)}, got {labels.get('severity')!r}",
        )
        for key in ("summary", "description"):
            failures.check(bool(annotations.get(key)), w, f"needs a {key} annotation")
        anchor = f"{rel(README)}#{alert['alert'].lower()}"
        failures.check(
            annotations.get("runbook") == anchor,
            w,
            f"runbook annotation must be {anchor!r}, got {annotations.get('runbook')!r}",
        )
        failures.check(
            alert["alert"] in headings, w, f"{rel(README)} has no `### {alert['alert']}` section"
        )
    for heading in headings:
        failures.check(heading in names, rel(README), f"### {heading}: no such alert")

    # The unit tests: a firing and a quiet case for every alert, and no unknown name.
    tests = yaml.safe_load(ALERTS_TEST.read_text())
    firing, quiet = set(), set()
    for test in tests.get("tests", []):
        for case in test.get("alert_rule_test", []):
            name = case.get("alertname")
            failures.check(name in names, rel(ALERTS_TEST), f"tests {name}, which is no alert")
            (firing if case.get("exp_alerts") else quiet).add(name)
    for name in names:
        failures.check(name in firing, rel(ALERTS_TEST), f"no case where {name} fires")
        failures.check(name in quiet, rel(ALERTS_TEST), f"no case where {name} stays quiet")


# --- 2. the dashboard -------------------------------------------------------------------


def panels_of(node: dict) -> list[dict]:
    out = []
    for panel in node.get("panels", []):
        out.append(panel)
        out.extend(panels_of(panel))  # a collapsed row keeps its panels inside
    return out


def grafana_to_promql(expr: str) -> str:
    """A dashboard query with Grafana's variables replaced, for promtool's parser."""
    expr = re.sub(r"\$\{?__\w+\}?", "5m", expr)  # $__rate_interval, $__interval, ...
    return re.sub(r"\$\{?\w+(?::\w+)?\}?", ".*", expr)  # $job, ${instance:regex}, ...


def check_dashboard(known: dict[str, str], promtool: str, failures: Failures) -> None:
    where = rel(DASHBOARD)
    try:
        dashboard = json.loads(DASHBOARD.read_text())
    except json.JSONDecodeError as e:
        failures.add(where, f"not JSON: {e}")
        return
    failures.check(
        bool(dashboard.get("uid")), where, "needs a fixed uid (links survive re-imports)"
    )
    failures.check(
        isinstance(dashboard.get("schemaVersion"), int) and dashboard["schemaVersion"] >= 36,
        where,
        "schemaVersion must be 36 or later",
    )
    variables = {v.get("name"): v for v in dig_list(dashboard, "templating", "list")}
    ds = variables.get("DS_PROMETHEUS", {})
    failures.check(
        ds.get("type") == "datasource" and ds.get("query") == "prometheus",
        where,
        "needs a datasource variable DS_PROMETHEUS of type prometheus",
    )
    for name in ("job", "instance"):
        var = variables.get(name, {})
        if failures.check(var.get("type") == "query", where, f"needs a query variable {name}"):
            failures.check(
                var.get("datasource") == DATASOURCE,
                where,
                f"${name}: datasource must be {DATASOURCE}",
            )
            query = var.get("query")
            query = query.get("query", "") if isinstance(query, dict) else str(query)
            metric = re.match(r"label_values\(\s*([A-Za-z_:][\w:]*)", query)
            failures.check(
                metric is not None and metric.group(1) in known,
                where,
                f"${name}: {query!r} must be label_values() of a metric of {rel(METRICS_RS)}",
            )

    panels = panels_of(dashboard)
    ids = [p.get("id") for p in panels]
    failures.check(all(isinstance(i, int) for i in ids), where, "every panel needs an integer id")
    for dup in sorted({i for i in ids if isinstance(i, int) and ids.count(i) > 1}):
        failures.add(where, f"panel id {dup} is used more than once")

    # Panels side by side, never on top of each other (each row is a line of its own).
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard.get("panels", []):
        pos = panel.get("gridPos", {})
        x, y, w, h = (pos.get(k) for k in ("x", "y", "w", "h"))
        if not failures.check(
            all(isinstance(v, int) for v in (x, y, w, h)) and x + w <= 24,
            where,
            f"panel {panel.get('id')}: gridPos {pos} is not within the 24-column grid",
        ):
            continue
        for cell in ((cx, cy) for cx in range(x, x + w) for cy in range(y, y + h)):
            if cell in cells:
                failures.add(where, f"panel {panel.get('id')} overlaps panel {cells[cell]}")
                break
            cells[cell] = str(panel.get("id"))

    graphed: set[str] = set()
    queries: list[tuple[str, str]] = []
    for panel in panels:
        if panel.get("type") == "row":
            continue
        pw = f"{where}: panel {panel.get('id')} {panel.get('title')!r}"
        failures.check(
            panel.get("datasource") == DATASOURCE, pw, f"datasource must be {DATASOURCE}"
        )
        targets = panel.get("targets", [])
        failures.check(bool(targets), pw, "no queries")
        refs = [t.get("refId") for t in targets]
        failures.check(len(set(refs)) == len(refs), pw, "refIds must be unique")
        for target in targets:
            tw = f"{pw} query {target.get('refId')}"
            failures.check(
                target.get("datasource") == DATASOURCE, tw, f"datasource must be {DATASOURCE}"
            )
            expr = target.get("expr", "")
            for name, matchers in check_names(expr, tw, known, set(), failures):
                if name in known:
                    graphed.add(known[name])
                for var in ("job", "instance"):
                    failures.check(
                        re.search(rf'\b{var}\s*=~\s*"\${var}"', matchers) is not None,
                        tw,
                        f'{name} must be filtered by {var}=~"${var}"',
                    )
            queries.append((tw, grafana_to_promql(expr)))

    for metric in sorted(set(known.values()) - graphed):
        failures.check(
            metric in NOT_GRAPHED,
            where,
            f"{metric} is on no panel: graph it, or list it in NOT_GRAPHED with the reason",
        )
    for metric in sorted(set(NOT_GRAPHED) & graphed):
        failures.add(where, f"{metric} is graphed but listed in NOT_GRAPHED")

    # promtool has no "parse this expression" command, but it parses every rule it checks.
    rules = [{"record": f"dashboard_query_{i}", "expr": q} for i, (_, q) in enumerate(queries)]
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "dashboard-queries.yaml"
        file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
        result = subprocess.run(
            [promtool, "check", "rules", str(file)], capture_output=True, text=True
        )
    if result.returncode != 0:
        output = result.stdout + result.stderr
        for i, (tw, query) in enumerate(queries):
            if re.search(rf"\bdashboard_query_{i}\b", output):
                failures.add(tw, f"promtool rejects {query!r}")
        failures.add(where, f"promtool check rules on the queries failed:\n{output.strip()}")


def dig_list(node: dict, *path: str) -> list:
    for key in path:
        node = node.get(key, {}) if isinstance(node, dict) else {}
    return node if isinstance(node, list) else []


# --- main -------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--promtool", default="promtool", help="the promtool binary")
    args = parser.parse_args()
    promtool = shutil.which(args.promtool)
    if promtool is None:
        raise SystemExit(f"{args.promtool}: not found (scripts/test-deploy installs promtool)")

    failures = Failures()
    known = known_metrics()
    print(f"  - {rel(ALERTS)}: metric names, annotations, runbooks, test coverage", flush=True)
    check_alerts(known, failures)
    print(f"  - {rel(DASHBOARD)}: panels, variables, metric names, promtool's parser", flush=True)
    check_dashboard(known, promtool, failures)

    return failures.report()


if __name__ == "__main__":
    sys.exit(main())
