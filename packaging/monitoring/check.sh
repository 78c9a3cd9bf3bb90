#!/usr/bin/env bash
# Checks the monitoring files: the alert rules load (`promtool check rules`),
# their unit tests pass (`promtool test rules`), and the Grafana dashboard is
# valid JSON whose panels have unique ids and PromQL that parses.
# Needs: promtool (Debian/Ubuntu package `prometheus`), python3.
set -euo pipefail
cd "$(dirname "$0")/../.."

dir=packaging/monitoring

promtool check rules "$dir/alerts.yml"
echo "monitoring: alerts.yml checked"

promtool test rules "$dir/alerts_test.yml"
echo "monitoring: alerts_test.yml passed"

# The dashboard: parses; unique panel ids; every panel but a row has a
# gridPos, the ${DS_PROMETHEUS} datasource and targets, each with an expr.
# Its exprs go into a scratch rule file so that promtool parses them.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
python3 - "$dir/grafana-dashboard.json" "$scratch/dashboard-exprs.yml" <<'PY'
import json, sys

path, rules_out = sys.argv[1], sys.argv[2]
with open(path) as f:
    dash = json.load(f)

errors = []
for key, want in (("uid", "lingua-fleet"), ("title", "Lingua fleet"), ("schemaVersion", 39)):
    if dash.get(key) != want:
        errors.append(f"{key} is {dash.get(key)!r}, not {want!r}")
if not any(v.get("name") == "DS_PROMETHEUS" for v in dash.get("templating", {}).get("list", [])):
    errors.append("no DS_PROMETHEUS templating variable")

panels = []
for p in dash.get("panels", []):
    panels.append(p)
    panels.extend(p.get("panels", []))  # a collapsed row holds its panels

ids = set()
exprs = []
for p in panels:
    name = f"panel {p.get('id')!r} ({p.get('title', '')})"
    if not isinstance(p.get("id"), int):
        errors.append(f"{name}: no integer id")
    elif p["id"] in ids:
        errors.append(f"{name}: duplicate id")
    ids.add(p.get("id"))
    if "gridPos" not in p:
        errors.append(f"{name}: no gridPos")
    if p.get("type") == "row":
        continue
    if p.get("datasource", {}).get("uid") != "${DS_PROMETHEUS}":
        errors.append(f"{name}: datasource is not ${{DS_PROMETHEUS}}")
    targets = p.get("targets") or []
    if not targets:
        errors.append(f"{name}: no targets")
    for t in targets:
        expr = (t.get("expr") or "").strip()
        if not expr:
            errors.append(f"{name}: target {t.get('refId')} has no expr")
        else:
            exprs.append(expr)

if errors:
    sys.exit(f"{path}:\n  " + "\n  ".join(errors))

with open(rules_out, "w") as f:
    f.write("groups:\n  - name: dashboard\n    rules:\n")
    for i, expr in enumerate(exprs):
        # Grafana's own interval variable is not PromQL: parse with a value.
        expr = expr.replace("$__rate_interval", "5m")
        f.write(f"      - record: dashboard_expr_{i}\n        expr: {json.dumps(expr)}\n")
PY
promtool check rules "$scratch/dashboard-exprs.yml" >/dev/null
echo "monitoring: grafana-dashboard.json checked"
