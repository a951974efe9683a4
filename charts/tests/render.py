#!/usr/bin/env python3
"""Lints and renders a chart offline with Helm's own SDK (helm-python-sdk), and
validates every rendered object against the Kubernetes schemas
(kubernetes-validate, strict: unknown fields are errors).

usage: render.py CHART VALUES_JSON [KUBE_VERSION]
prints one JSON object: {"lint": [...], "objects": [...], "invalid": [...], "unchecked": [...]}
exit 3 when a package is missing (the caller says how to install it).
"""
import json
import sys

try:
    import helm_python as helm
    import kubernetes_validate
    import yaml
    import jsonschema
except ImportError as e:  # pragma: no cover
    print(f"missing python package: {e.name}; pip install helm-python-sdk kubernetes-validate", file=sys.stderr)
    sys.exit(3)

chart_dir, values_json = sys.argv[1], sys.argv[2]
kube_version = sys.argv[3] if len(sys.argv) > 3 else "1.33.0"
values = json.loads(values_json)

report = helm.lint(chart_dir, values, strict=True, namespace="cluster-tunnel", kube_version=f"v{kube_version}")
lint = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2] + [
    {"severity": 3, "error": e} for e in report.get("errors", []) or []
]

chart = helm.Chart.load(chart_dir)
rendered = chart.render(values, name="cluster-tunnel", namespace="cluster-tunnel", is_install=True)
objects, invalid, unchecked = [], [], []
texts = list(rendered.items())
for crd in chart.crds:
    texts.append((crd.get("name", "crd"), crd.get("data", "")))
# Custom resources are checked against the chart's own CRDs.
crd_schemas = {}
for _, text in texts:
    for doc in yaml.safe_load_all(text):
        if doc and doc.get("kind") == "CustomResourceDefinition":
            for v in doc["spec"]["versions"]:
                crd_schemas[(f"{doc['spec']['group']}/{v['name']}", doc["spec"]["names"]["kind"])] = v["schema"]["openAPIV3Schema"]
# open-cluster-management's own CRDs (copied in ocm-crds/), for the addon objects the hub chart renders.
import os
ocm_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ocm-crds")
for name in sorted(os.listdir(ocm_dir)):
    if name.endswith(".yaml"):
        with open(os.path.join(ocm_dir, name)) as f:
            for doc in yaml.safe_load_all(f):
                if doc and doc.get("kind") == "CustomResourceDefinition":
                    for v in doc["spec"]["versions"]:
                        crd_schemas[(f"{doc['spec']['group']}/{v['name']}", doc["spec"]["names"]["kind"])] = v["schema"]["openAPIV3Schema"]
for path, text in texts:
    for doc in yaml.safe_load_all(text):
        if not doc:
            continue
        doc["__source"] = path
        objects.append(doc)
        body = {k: v for k, v in doc.items() if k != "__source"}
        try:
            kubernetes_validate.validate(body, kube_version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            schema = crd_schemas.get((doc["apiVersion"], doc["kind"]))
            if schema is None:
                unchecked.append(f"{doc['kind']} {doc['apiVersion']}")
                continue
            for e in jsonschema.Draft7Validator(schema).iter_errors({k: v for k, v in body.items() if k not in ("apiVersion", "kind", "metadata")}):
                where = ".".join(str(p) for p in e.path)
                invalid.append(f"{path}: {doc['kind']}/{doc['metadata'].get('name')}: {where}: {e.message}")
        except kubernetes_validate.ValidationError as e:
            where = ".".join(str(p) for p in e.caught.path)
            invalid.append(f"{path}: {doc['kind']}/{doc['metadata'].get('name')}: {where}: {e.caught.message}")
print(json.dumps({"lint": lint, "objects": objects, "invalid": invalid, "unchecked": unchecked}))
