"""The Kubernetes manifests: rendered with kubectl kustomize, validated against the API schemas
offline (kubernetes-validate), and checked against what the node really serves and reads."""

from __future__ import annotations

import base64
import tempfile
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml

from conftest import TOKEN
from test_secrets import fresh_clone, kustomize, secrets_init
from mcpp.net import identity
from mcpp.config import DEFAULT_MCP_PORT, ENV_PREFIX, SETTINGS, parse_swarm_key
from mcpp.harness import ProcessCluster
from mcpp.harness.docker import MCP_PORT, P2P_PORT
from mcpp.harness.image import IMAGE_TAG

REPO = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def objects(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """k8s/ rendered as a user renders it: a fresh clone, `mcpp secrets init`, kubectl kustomize."""
    clone = fresh_clone(tmp_path_factory.mktemp("clone"))
    init = secrets_init(clone)
    assert init.returncode == 0, init.stderr
    out = kustomize(clone)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def test_every_object_validates_against_the_api_schemas(objects: list[dict[str, Any]]) -> None:
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == ["ConfigMap", "Deployment", "Namespace", "NetworkPolicy", "PodDisruptionBudget",
                     "PodDisruptionBudget", "Secret", "Secret", "Service", "Service", "StatefulSet"]
    for o in objects:
        kubernetes_validate.validate(o, "1.30", strict=True)
        if o["kind"] != "Namespace":
            assert o["metadata"]["namespace"] == "mcpp"


def pods(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o["spec"]["template"]["spec"] for o in objects if o["kind"] in ("StatefulSet", "Deployment")]


def test_ports_probes_image_and_env_match_the_node(objects: list[dict[str, Any]], tmp_path: Path) -> None:
    cm = by_kind(objects, "ConfigMap")[0]["data"]
    for spec in pods(objects):
        (c,) = spec["containers"]
        assert c["image"] == IMAGE_TAG
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {"p2p": P2P_PORT, "mcp": MCP_PORT} and MCP_PORT == DEFAULT_MCP_PORT
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "mcp"}
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "mcp"}
        assert spec["securityContext"]["runAsUser"] == 10001
        names = [e["name"] for e in c.get("env", [])] + list(cm)
        for n in names:
            assert n.startswith(ENV_PREFIX) and n[len(ENV_PREFIX):].lower() in SETTINGS, f"{n} is not a setting"
    # the image listens where the manifests say (Dockerfile defaults)
    dockerfile = (REPO / "node" / "Dockerfile").read_text()
    assert f"MCPP_LISTEN=/ip4/0.0.0.0/tcp/{P2P_PORT}" in dockerfile and f"MCPP_MCP_PORT={MCP_PORT}" in dockerfile
    assert "USER 10001:10001" in dockerfile
    # the probe paths are served by a real node: /healthz 200, /readyz 200 once joined
    with ProcessCluster(1, tmp_path, token=TOKEN) as c:
        base = c.nodes[0].base_url
        assert httpx.get(base + "/healthz").status_code == 200
        assert httpx.get(base + "/readyz").status_code == 200


def test_services_and_bootstrap_identity(objects: list[dict[str, Any]]) -> None:
    svcs = {s["metadata"]["name"]: s["spec"] for s in by_kind(objects, "Service")}
    assert svcs["mcpp-bootstrap"]["clusterIP"] == "None" and svcs["mcpp-bootstrap"]["publishNotReadyAddresses"]
    assert {p["port"] for p in svcs["mcpp-mcp"]["ports"]} == {MCP_PORT}
    sts = by_kind(objects, "StatefulSet")[0]
    assert sts["spec"]["serviceName"] == "mcpp-bootstrap" and sts["spec"]["replicas"] == 1
    # generated Secrets: their names carry a hash of their content (a rotation rolls the pods)
    secrets = {x["metadata"]["name"].rsplit("-", 1)[0]: x for x in by_kind(objects, "Secret")}
    names = {k: v["metadata"]["name"] for k, v in secrets.items()}
    key = base64.b64decode(secrets["mcpp-bootstrap-identity"]["data"]["identity.key"])
    with tempfile.NamedTemporaryFile() as f:
        f.write(key)
        f.flush()
        peer_id = identity.peer_id_of(identity.load(f.name))
    boot = by_kind(objects, "ConfigMap")[0]["data"]["MCPP_BOOTSTRAP"]
    assert boot == f"/dns4/mcpp-bootstrap-0.mcpp-bootstrap.mcpp.svc.cluster.local/tcp/{P2P_PORT}/p2p/{peer_id}"
    mounts = {m["name"]: m["mountPath"] for m in sts["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    env = {e["name"]: e.get("value") for e in sts["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MCPP_IDENTITY"] == mounts["identity"] + "/identity.key"
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    assert volumes["identity"]["secret"]["secretName"] == names["mcpp-bootstrap-identity"]
    # the MCP token and the swarm key come from a Secret, into every node (bootstrap and workers)
    sec = {k: base64.b64decode(v).decode() for k, v in secrets["mcpp-secrets"]["data"].items()}
    assert len(sec["mcp-token"]) >= 16 and len(parse_swarm_key(sec["swarm-key"])) == 64
    for wl in (*by_kind(objects, "StatefulSet"), *by_kind(objects, "Deployment")):
        refs = {e["name"]: e.get("valueFrom", {}).get("secretKeyRef") for e in
                wl["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert refs["MCPP_TOKEN"] == {"name": names["mcpp-secrets"], "key": "mcp-token"}
        assert refs["MCPP_SWARM_KEY"] == {"name": names["mcpp-secrets"], "key": "swarm-key"}
    # the mesh port from mcpp pods only; MCP only from pods or namespaces labelled as MCP clients
    netpol = by_kind(objects, "NetworkPolicy")[0]["spec"]
    rules = {p["port"]: rule["from"] for rule in netpol["ingress"] for p in rule["ports"]}
    assert sorted(rules) == [P2P_PORT, MCP_PORT]
    assert rules[P2P_PORT] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "mcpp"}}}]
    client = {"mcpp-mcp-client": "true"}
    assert rules[MCP_PORT] == [{"podSelector": {"matchLabels": client}}, {"namespaceSelector": {"matchLabels": client}}]
