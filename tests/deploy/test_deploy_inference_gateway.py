"""deploy/k8s/inference-gateway: the InferencePool validates against the released CRD (v1.5.0, vendored), the core
objects against the Kubernetes schemas, the pieces point at each other, and every metric the endpoint picker is
told to read is one Loom exports (test_deploy_prometheus_live.py checks a running `loom serve` serves them)."""
from __future__ import annotations

import jsonschema
import pytest

from tests.support.deploy import DEPLOY, GATEWAY, load_yaml, load_yaml_all, picker_metric_flags

CRD = GATEWAY / "crds" / "inference.networking.k8s.io_inferencepools.yaml"
KUBERNETES_VERSION = "1.30"


@pytest.fixture(scope="module")
def docs() -> dict[tuple[str, str], dict]:
    """(kind, name) -> manifest, for everything kustomization.yaml lists."""
    found = {}
    for name in load_yaml(GATEWAY / "kustomization.yaml")["resources"]:
        for doc in load_yaml_all(GATEWAY / name):
            found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


@pytest.fixture(scope="module")
def pool_schema() -> dict:
    crd = load_yaml(CRD)
    assert crd["metadata"]["annotations"]["inference.networking.k8s.io/bundle-version"] == "v1.5.0"
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return v1["schema"]["openAPIV3Schema"]


def test_inference_pool_matches_the_released_crd(docs, pool_schema):
    pool = docs[("InferencePool", "loom")]
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    jsonschema.validate(pool, pool_schema)
    broken = {**pool, "spec": {k: v for k, v in pool["spec"].items() if k != "targetPorts"}}
    with pytest.raises(jsonschema.ValidationError, match="targetPorts"):  # the schema is not vacuous
        jsonschema.validate(broken, pool_schema)


def test_core_objects_match_the_kubernetes_schemas(docs):
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    core = [d for (kind, _), d in docs.items() if kind not in ("InferencePool", "HTTPRoute")]
    assert {d["kind"] for d in core} == {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Deployment", "Service"}
    for doc in core:
        kv.validate(doc, KUBERNETES_VERSION, strict=True)


def test_pool_route_and_picker_point_at_each_other(docs):
    pool = docs[("InferencePool", "loom")]["spec"]
    loom = load_yaml(DEPLOY / "k8s" / "deployment.yaml")["spec"]["template"]
    assert pool["selector"]["matchLabels"].items() <= loom["metadata"]["labels"].items()
    ports = {p["containerPort"] for p in loom["spec"]["containers"][0]["ports"]}
    assert [p["number"] for p in pool["targetPorts"]] == [8000] and 8000 in ports
    picker = docs[("Service", pool["endpointPickerRef"]["name"])]
    assert pool["endpointPickerRef"]["port"]["number"] in {p["port"] for p in picker["spec"]["ports"]}
    epp = docs[("Deployment", "loom-epp")]["spec"]["template"]
    assert picker["spec"]["selector"].items() <= epp["metadata"]["labels"].items()
    (backend,) = docs[("HTTPRoute", "loom")]["spec"]["rules"][0]["backendRefs"]
    assert backend == {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": "loom"}
    args = epp["spec"]["containers"][0]["args"]
    assert args[args.index("--pool-name") + 1] == "loom"
    config_file = args[args.index("--config-file") + 1]
    mount = epp["spec"]["containers"][0]["volumeMounts"][0]
    config = docs[("ConfigMap", "loom-epp-config")]["data"][config_file.removeprefix(mount["mountPath"] + "/")]
    import yaml
    plugins = yaml.safe_load(config)
    defined = {p.get("name", p["type"]) for p in plugins["plugins"]}
    used = {ref["pluginRef"] for profile in plugins["schedulingProfiles"] for ref in profile["plugins"]}
    assert used == defined


def test_picker_reads_only_metrics_loom_exports(metric_names):
    flags = picker_metric_flags()
    assert set(flags) == {"--total-queued-requests-metric", "--total-running-requests-metric",
                          "--kv-cache-usage-percentage-metric", "--cache-info-metric", "--lora-info-metric"}
    assert flags.pop("--lora-info-metric") == "", "Loom has no LoRA adapters: that scrape is off"
    assert set(flags.values()) <= metric_names, set(flags.values()) - metric_names
