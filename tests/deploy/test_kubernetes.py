"""The Kubernetes manifests (deploy/kubernetes) render with kustomize, validate against the Kubernetes schemas
(kubernetes-validate, offline, strict) and say what pdmesh needs: the token from a Secret everywhere, the
/dev/shm volume larger than the tier pool, probes on the real health endpoints, pools scaled independently.
No cluster runs here: this checks the manifests, not a deployment."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pdmesh.kvcache.config import parse_size

ROOT = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"


def render(overlay: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        if os.environ.get("PDMESH_REQUIRE_KUBECTL") == "1":
            pytest.fail("kubectl not installed and PDMESH_REQUIRE_KUBECTL=1")
        pytest.skip("kubectl not installed (it renders the kustomizations)")
    out = subprocess.run(
        [kubectl, "kustomize", str(ROOT / "overlays" / overlay)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_manifests_validate_against_the_kubernetes_schemas(overlay):
    import kubernetes_validate

    docs = render(overlay)
    kinds = sorted({d["kind"] for d in docs})
    assert kinds == [
        "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service", "StatefulSet",
    ]  # fmt: skip
    for d in docs:
        kubernetes_validate.validate(d, "1.32", strict=True)  # raises ValidationError naming the field


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_every_process_gets_the_token_from_the_secret(overlay):
    docs = render(overlay)
    workloads = {**by_kind(docs, "Deployment"), **by_kind(docs, "StatefulSet")}
    assert set(workloads) == {"pdmesh-router", "pdmesh-prefill", "pdmesh-decode", "pdmesh-cache-server"}
    for name, w in workloads.items():
        (c,) = w["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e for e in c["env"]}
        ref = env["PDMESH_CLUSTER_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "pdmesh-cluster-token", "key": "token"}, name
        assert not any("value" in e and "TOKEN" in e["name"] for e in c["env"]), name  # never a literal


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_workers_are_pools_with_shm_probes_and_autoscalers(overlay):
    docs = render(overlay)
    deployments = by_kind(docs, "Deployment")
    hpas = by_kind(docs, "HorizontalPodAutoscaler")
    pdbs = by_kind(docs, "PodDisruptionBudget")
    for role, cmd, port in (("prefill", "prefiller", 8100), ("decode", "decoder", 8200)):
        d = deployments[f"pdmesh-{role}"]
        spec = d["spec"]["template"]["spec"]
        (c,) = spec["containers"]
        assert c["args"][:1] == [cmd] and str(port) in c["args"]
        env = {e["name"]: e for e in c["env"]}
        assert env["PDMESH_ADVERTISE_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        assert env["PDMESH_ROUTER_URL"]["value"] == "http://pdmesh-router-peers:8000"  # every router pod
        assert env["PDMESH_TIER_REMOTE_URL"]["value"] == "pdmesh://pdmesh-cache-server:8400"
        # the tier pool lives in /dev/shm: a memory-backed volume larger than the pool
        shm = next(v for v in spec["volumes"] if v["name"] == "dshm")["emptyDir"]
        mount = next(m for m in c["volumeMounts"] if m["name"] == "dshm")
        assert shm["medium"] == "Memory" and mount["mountPath"] == "/dev/shm"
        pool = (
            c["args"][c["args"].index("--tier-pool-bytes") + 1] if "--tier-pool-bytes" in c["args"] else None
        )
        pool_bytes = parse_size(pool or env["PDMESH_TIER_POOL_BYTES"]["value"])
        assert parse_size(shm["sizeLimit"].replace("Gi", "GiB").replace("Mi", "MiB")) > pool_bytes
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
        assert {p["name"]: p["containerPort"] for p in c["ports"]}["http"] == port
        assert hpas[f"pdmesh-{role}"]["spec"]["scaleTargetRef"]["name"] == f"pdmesh-{role}"
        assert pdbs[f"pdmesh-{role}"]["spec"]["maxUnavailable"] == 1
        assert spec["terminationGracePeriodSeconds"] >= 30  # deregister, then stop the engine
        limits = c["resources"]["limits"]
        assert ("nvidia.com/gpu" in limits) == (overlay == "gpu")
        assert (c["image"] == "pdmesh:gpu") == (overlay == "gpu") and c["image"] in (
            "pdmesh:cpu",
            "pdmesh:gpu",
        )
    router = deployments["pdmesh-router"]["spec"]["template"]["spec"]["containers"][0]
    assert router["readinessProbe"]["httpGet"]["path"] == "/health"
    services = by_kind(docs, "Service")
    assert services["pdmesh-router"]["spec"]["ports"][0]["port"] == 8000
    assert services["pdmesh-prefill"]["spec"]["clusterIP"] == "None"  # one DNS record per pod


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_workers_register_with_every_router_pod(overlay):
    """Several router pods each hold the whole registry: workers heartbeat every address of a headless Service
    that publishes router pods before they are ready (a router is ready only once workers registered)."""
    docs = render(overlay)
    router = by_kind(docs, "Deployment")["pdmesh-router"]
    peers = by_kind(docs, "Service")["pdmesh-router-peers"]["spec"]
    assert router["spec"]["replicas"] >= 2
    assert peers["clusterIP"] == "None" and peers["publishNotReadyAddresses"] is True
    assert peers["selector"] == router["spec"]["selector"]["matchLabels"]
    assert by_kind(docs, "PodDisruptionBudget")["pdmesh-router"]["spec"]["maxUnavailable"] == 1


def test_images_are_the_compose_images():
    compose = yaml.safe_load((ROOT.parents[1] / "docker-compose.yml").read_text())
    assert compose["x-pdmesh"]["image"] == "pdmesh:cpu"
    cpu = render("cpu")
    images = {c["image"] for d in cpu if d["kind"] in ("Deployment", "StatefulSet")
              for c in d["spec"]["template"]["spec"]["containers"]}  # fmt: skip
    assert images == {"pdmesh:cpu"}
