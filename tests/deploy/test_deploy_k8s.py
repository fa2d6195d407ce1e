"""deploy/k8s: every manifest validated against the Kubernetes OpenAPI schemas with kubernetes-validate (strict: unknown
fields fail; `pip install kubernetes-validate`, skipped without it), and structurally with PyYAML: probes, ports,
GPU request, non-root user, the shutdown budget, the HPA's metric and the adapter rule that serves it."""
from __future__ import annotations

import copy
import re

import pytest
import yaml

from tests.support.deploy import DEPLOY, ROOT, find_tool, load_yaml, load_yaml_all, run

K8S = DEPLOY / "k8s"
KUBERNETES_VERSIONS = ["1.29.0", "1.33.0"]  # oldest and newest we promise (autoscaling/v2 needs >= 1.23)
UVICORN_GRACEFUL_SECONDS = 10  # server/api/cli.py: timeout_graceful_shutdown after the drain


@pytest.fixture(scope="module")
def docs() -> dict[str, dict]:
    """kind -> manifest, for every resource kustomization.yaml lists."""
    kustomization = load_yaml(K8S / "kustomization.yaml")
    out = {}
    for name in kustomization["resources"]:
        for doc in load_yaml_all(K8S / name):
            assert doc["kind"] not in out, f"two {doc['kind']}s"
            out[doc["kind"]] = doc
    return out


def test_kustomization_lists_every_manifest(docs):
    listed = set(load_yaml(K8S / "kustomization.yaml")["resources"])
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "prometheus-adapter-values.yaml"}
    assert listed == manifests
    assert set(docs) == {"ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler"}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_match_the_kubernetes_schemas(docs, version):
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    for doc in docs.values():
        kv.validate(doc, version, strict=True)  # raises ValidationError with the offending path


def test_kustomize_renders_the_same_resources(docs):
    """`kubectl apply -k deploy/k8s` works: kustomize (built into kubectl, no cluster needed) renders the set."""
    kubectl = find_tool("kubectl")
    if not kubectl:
        pytest.skip("kubectl not installed")
    res = run([kubectl, "kustomize", str(K8S)], env={"KUBECONFIG": "/dev/null", "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr
    rendered = {d["kind"]: d for d in yaml.safe_load_all(res.stdout) if d}
    assert set(rendered) == set(docs)
    assert rendered["Deployment"]["spec"]["template"]["spec"]["containers"][0]["image"] == "loom:gpu"
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    for doc in rendered.values():
        kv.validate(doc, KUBERNETES_VERSIONS[-1], strict=True)


def test_schema_validation_is_not_vacuous(docs):
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    bad = copy.deepcopy(docs["Deployment"])
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pathh"] = "/ready"
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, KUBERNETES_VERSIONS[-1], strict=True)


@pytest.fixture(scope="module")
def pod(docs) -> dict:
    return docs["Deployment"]["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def container(pod) -> dict:
    assert len(pod["containers"]) == 1
    return pod["containers"][0]


@pytest.fixture(scope="module")
def config(docs) -> dict[str, str]:
    return docs["ConfigMap"]["data"]


def test_configmap_sets_only_real_settings(docs, config, loom_env_vars, container):
    assert all(isinstance(v, str) for v in config.values()), "ConfigMap values are strings"
    unknown = set(config) - loom_env_vars
    assert not unknown, f"variables Loom does not read: {unknown}"
    assert "LOOM_API_KEY" not in config, "the key comes from a Secret"
    assert [e["configMapRef"]["name"] for e in container["envFrom"]] == [docs["ConfigMap"]["metadata"]["name"]]
    key = next(e for e in container["env"] if e["name"] == "LOOM_API_KEY")["valueFrom"]["secretKeyRef"]
    assert key["optional"] is True
    assert "args" not in container and "command" not in container, "flags would override the ConfigMap"


def test_ports_and_probes(container, config):
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": int(config["LOOM_PORT"])} == {"http": 8000}
    probes = {k: container[k]["httpGet"] for k in ("livenessProbe", "readinessProbe", "startupProbe")}
    assert probes["readinessProbe"]["path"] == "/ready"
    assert probes["livenessProbe"]["path"] == "/health" and probes["startupProbe"]["path"] == "/health", \
        "liveness must not depend on the model being loaded"
    assert all(p["port"] in ports for p in probes.values())
    assert config["LOOM_HOST"] == "0.0.0.0", "probes reach the pod IP"


def test_gpu_request_and_security(pod, container):
    res = container["resources"]
    assert res["limits"]["nvidia.com/gpu"] == 1
    assert res["requests"].get("nvidia.com/gpu", 1) == res["limits"]["nvidia.com/gpu"], \
        "extended resources: request == limit"
    sc = pod["securityContext"]
    dockerfile_uid = re.search(r"^USER (\d+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE).group(1)
    assert sc["runAsNonRoot"] is True and str(sc["runAsUser"]) == dockerfile_uid
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])


def test_shutdown_budget_covers_prestop_and_drain(pod, container, config, default_drain_timeout):
    """On delete the kubelet runs preStop, then sends SIGTERM (Loom: /ready -> 503, drain up to the drain timeout,
    then uvicorn's own graceful stop), and SIGKILLs at terminationGracePeriodSeconds counted from preStop's start."""
    cmd = container["lifecycle"]["preStop"]["exec"]["command"]
    assert cmd[0] == "sleep" and len(cmd) == 2
    pre_stop = float(cmd[1])
    drain = float(config.get("LOOM_DRAIN_TIMEOUT", default_drain_timeout))
    grace = pod["terminationGracePeriodSeconds"]
    assert 0 < pre_stop < drain
    assert grace > pre_stop + drain + UVICORN_GRACEFUL_SECONDS, (grace, pre_stop, drain)
    assert grace >= drain and grace > pre_stop


def test_service_selects_the_pods(docs, container):
    svc = docs["Service"]["spec"]
    labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert svc["selector"].items() <= labels.items()
    assert docs["Deployment"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert [p["targetPort"] for p in svc["ports"]] == ["http"] and svc["ports"][0]["port"] == 8000


def test_scrape_annotations_match_the_port(docs, container):
    ann = docs["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/path"] == "/metrics"
    assert int(ann["prometheus.io/port"]) == container["ports"][0]["containerPort"]


def test_hpa_scales_on_the_waiting_queue(docs, metric_names):
    hpa = docs["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", docs["Deployment"]["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    assert name == "loom_num_requests_waiting" and name in metric_names, \
        "the HPA's metric is the waiting-queue gauge server/api/metrics.py exports"
    assert metric["pods"]["target"]["type"] == "AverageValue"

    adapter = load_yaml(K8S / "prometheus-adapter-values.yaml")["rules"]["custom"]
    rule = next(r for r in adapter if r["name"]["as"] == name)
    assert rule["seriesQuery"].startswith(name + "{")
    assert re.fullmatch(rule["name"]["matches"], name)
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    assert "<<.Series>>" in rule["metricsQuery"] and "<<.LabelMatchers>>" in rule["metricsQuery"]


def test_guide_documents_scaling_and_its_limits():
    guide = (K8S / "README.md").read_text()
    for needle in ("prometheus-adapter", "custom.metrics.k8s.io", "kubectl apply -k deploy/k8s", "replicas",
                   "tensor parallelism", "future work", "terminationGracePeriodSeconds", "LOOM_DRAIN_TIMEOUT"):
        assert needle in guide, needle
