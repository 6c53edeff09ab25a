"""deploy/k8s cannot be applied here (no cluster), so it is checked offline: `kubectl kustomize`
renders every overlay (Debian's kubernetes-client; `make deps` installs it), every object
validates against the Kubernetes schemas (kubernetes-validate, strict), and what the objects
say about the gateway is true of the gateway: probe paths are routes of its aiohttp app, env
vars parse into Settings, Services and ports named in settings exist."""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from aiohttp import web

import gateway.api
from gateway.config import Settings, load_settings
from gateway.metrics import Metrics
from tests.conftest import unavailable

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu-dedicated", "gpu-shared")
GPU_OVERLAYS = ("gpu-dedicated", "gpu-shared")
#: Schemas shipped by kubernetes-validate; 1.31 has every API used (autoscaling/v2, policy/v1,
#: topologySpreadConstraints.matchLabelKeys).
K8S_VERSION = "1.31.0"
NAMESPACE = "switchyard"
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "CronJob")
#: Triton's own endpoints the manifests probe (Triton is not this repo's code).
TRITON_PATHS = {"/v2/health/live", "/v2/health/ready"}
SECRET_VALUE = "0123abcd"  # stands in for secretKeyRef values when expanding $(VAR)

Obj = dict[str, Any]


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        unavailable("kubectl not installed (make deps, or apt-get install kubernetes-client)")
    return path


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Obj]]:
    """Every overlay rendered once, the three in parallel."""
    exe = kubectl()
    procs = {
        name: subprocess.Popen(
            [exe, "kustomize", str(K8S / "overlays" / name)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in OVERLAYS
    }
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"kubectl kustomize overlays/{name}: {stderr}"
        out[name] = [doc for doc in yaml.safe_load_all(stdout) if doc]
    return out


def find(objs: list[Obj], kind: str, name: str | None = None) -> list[Obj]:
    return [
        o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]


def one(objs: list[Obj], kind: str, name: str) -> Obj:
    (obj,) = find(objs, kind, name)
    return obj


def template_of(workload: Obj) -> Obj:
    """A workload's pod template (a CronJob's sits in its job template)."""
    if workload["kind"] == "CronJob":
        return workload["spec"]["jobTemplate"]["spec"]["template"]
    return workload["spec"]["template"]


def pod_specs(objs: list[Obj]) -> Iterator[tuple[Obj, Obj]]:
    """(workload, pod template) for every Deployment, StatefulSet, DaemonSet and CronJob."""
    for o in objs:
        if o["kind"] in WORKLOADS:
            yield o, template_of(o)


def containers(template: Obj, init: bool = True) -> list[Obj]:
    spec = template["spec"]
    return list(spec["containers"]) + (list(spec.get("initContainers", [])) if init else [])


def container(objs: list[Obj], workload: str, name: str) -> Obj:
    (dep,) = [o for o in objs if o["kind"] in WORKLOADS and o["metadata"]["name"] == workload]
    (c,) = [c for c in containers(template_of(dep)) if c["name"] == name]
    return c


def selects(selector: Obj, labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"only matchLabels selectors are checked: {selector}"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def gateway_routes() -> set[tuple[str, str]]:
    """(method, path) of every route the gateway's aiohttp app serves (gateway/api/*.py)."""
    found = set()
    for info in pkgutil.iter_modules(gateway.api.__path__):
        module = importlib.import_module(f"gateway.api.{info.name}")
        for value in vars(module).values():
            if isinstance(value, web.RouteTableDef):
                found |= {(r.method, r.path) for r in value if isinstance(r, web.RouteDef)}
    return found


def expanded_env(c: Obj) -> dict[str, str]:
    """A container's env as the kubelet hands it over: $(VAR) expanded from earlier entries,
    secret references given a stand-in value."""
    env: dict[str, str] = {}
    for var in c.get("env", []):
        if "valueFrom" in var:
            assert "secretKeyRef" in var["valueFrom"], var
            env[var["name"]] = SECRET_VALUE
            continue
        value = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), var["value"])
        assert "$(" not in value, f"{c['name']}: unresolved reference in {var['name']}={value}"
        env[var["name"]] = value
    return env


def settings_of(c: Obj) -> Settings:
    """The Settings a gateway container starts with: the image's config file (the repo's:
    the Dockerfile copies configs/) under the container's SWITCHYARD__* env."""
    command = c["command"]
    assert command[:4] == ["python", "-m", "gateway", "serve"] or command[:5] == [
        "python", "-m", "gateway", "predlog", "archive",
    ], command  # fmt: skip
    config = command[command.index("--config") + 1]
    env = {k: v for k, v in expanded_env(c).items() if k.startswith("SWITCHYARD__")}
    if "auth" not in {f for f in Settings.__dataclass_fields__}:
        # TODO(merge): auth.* comes with the API-key branch; until Settings has an `auth`
        # section its keys cannot parse here. Once it has, this drops out by itself.
        env = {k: v for k, v in env.items() if not k.startswith("SWITCHYARD__AUTH__")}
    return load_settings(ROOT / config, env=env, base_dir=Path("/app"))


def gateway_settings(objs: list[Obj]) -> Settings:
    return settings_of(container(objs, "gateway", "gateway"))


def service_port(objs: list[Obj], host: str, port: int) -> Obj:
    """The Service named ``host`` and its port ``port``: it must exist."""
    svc = find(objs, "Service", host)
    assert svc, f"no Service {host!r}"
    ports = [p for p in svc[0]["spec"]["ports"] if p["port"] == port]
    assert ports, f"Service {host} has no port {port}"
    return svc[0]


# -- rendering and schemas -----------------------------------------------------------------


def test_every_object_validates_against_the_kubernetes_schemas(rendered) -> None:
    # Each distinct object once: most are the same in every overlay, and the validator reads
    # its schema files again for every call.
    distinct: dict[str, tuple[Obj, list[str]]] = {}
    for overlay, objs in rendered.items():
        for obj in objs:
            key = json.dumps(obj, sort_keys=True)
            distinct.setdefault(key, (obj, []))[1].append(overlay)
    errors = []
    for obj, overlays in distinct.values():
        what = f"{obj['kind']}/{obj['metadata']['name']} ({', '.join(overlays)})"
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{what}: {'.'.join(map(str, exc.path))}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            errors.append(f"{what}: {exc.message}")  # a typo in apiVersion or kind
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == NAMESPACE, what
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_holds_the_whole_stack(rendered, overlay) -> None:
    kinds = {(o["kind"], o["metadata"]["name"]) for o in rendered[overlay]}
    for expected in [
        ("Namespace", NAMESPACE),
        ("Deployment", "gateway"),
        ("Service", "gateway"),
        ("HorizontalPodAutoscaler", "gateway"),
        ("PodDisruptionBudget", "gateway"),
        ("Deployment", "triton"),
        ("Service", "triton"),
        ("Deployment", "triton-fallback"),
        ("Service", "triton-fallback"),
        ("StatefulSet", "redis"),
        ("Service", "redis"),
        ("Deployment", "prometheus"),
        ("NetworkPolicy", "triton"),
        ("NetworkPolicy", "redis"),
        ("ConfigMap", "switchyard-routes"),
    ]:
        assert expected in kinds, expected


def test_every_image_is_pinned_and_the_gateway_image_is_this_version(rendered) -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for overlay, objs in rendered.items():
        for workload, template in pod_specs(objs):
            for c in containers(template):
                image = c["image"]
                name, _, tag = image.rpartition("/")[2].partition(":")
                assert "@sha256:" in image or (tag and tag != "latest"), f"{overlay}: {image}"
                if name == "switchyard-gateway":
                    assert tag == version, f"{workload['metadata']['name']}: {image}"


# -- the gateway ---------------------------------------------------------------------------


def test_probes_hit_real_routes_on_declared_ports(rendered) -> None:
    gets = {path for method, path in gateway_routes() if method == "GET"}
    assert {"/healthz", "/readyz", "/metrics"} <= gets  # the collection itself works
    for overlay, objs in rendered.items():
        for workload, template in pod_specs(objs):
            for c in containers(template, init=False):
                ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
                for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                    probe = c.get(kind)
                    if probe is None or "httpGet" not in probe:
                        continue
                    where = f"{overlay}: {workload['metadata']['name']}/{c['name']} {kind}"
                    port, path = probe["httpGet"]["port"], probe["httpGet"]["path"]
                    assert port in ports or port in ports.values(), f"{where}: port {port}"
                    if c["name"] == "gateway":
                        assert path in gets, f"{where}: the gateway serves no GET {path}"
                    elif c["name"] == "triton":
                        assert path in TRITON_PATHS, f"{where}: {path}"
                        assert f"--http-port={ports['http']}" in c["command"], where
        gw = container(objs, "gateway", "gateway")
        assert gw["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert gw["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert "startupProbe" in gw


def test_gateway_ports_match_its_settings(rendered) -> None:
    objs = rendered["cpu"]
    settings = gateway_settings(objs)
    ports = {p["name"]: p["containerPort"] for p in container(objs, "gateway", "gateway")["ports"]}
    assert ports["http"] == settings.server.port
    # TODO(merge): server.grpc_port (the OIP gRPC listener) comes with the gRPC branch; until
    # then the port the issue names is checked. The env leaves it at its default on purpose.
    assert ports["grpc"] == getattr(settings.server, "grpc_port", 8081)
    svc = one(objs, "Service", "gateway")
    assert {p["targetPort"] for p in svc["spec"]["ports"]} == {"http", "grpc"}
    labels = one(objs, "Deployment", "gateway")["spec"]["template"]["metadata"]["labels"]
    assert selects({"matchLabels": svc["spec"]["selector"]}, labels)


def test_every_switchyard_env_var_parses_into_settings(rendered) -> None:
    checked = 0
    for objs in rendered.values():
        for _, template in pod_specs(objs):
            for c in containers(template):
                names = {v["name"] for v in c.get("env", [])}
                if any(n.startswith("SWITCHYARD__") for n in names):
                    settings_of(c)  # raises ConfigError on an unknown key or a bad value
                    checked += 1
    assert checked == 2 * len(OVERLAYS)  # the gateway's and the archiver's, in each overlay


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_env_parses_into_settings_that_name_real_services(rendered, overlay) -> None:
    objs = rendered[overlay]
    s = gateway_settings(objs)
    assert [spec.name for spec in s.triton.server_specs()] == ["primary", "fallback"]
    for spec in s.triton.server_specs():
        host, _, port = spec.grpc_url.rpartition(":")
        svc = service_port(objs, host, int(port))
        assert svc["spec"].get("clusterIP") == "None", f"{host}: headless, one address per pod"
    members_http = [spec.http_url for spec in s.triton.server_specs()]
    assert all(members_http), "each member infers over HTTP (triton.infer_protocol: http)"
    for url in (s.triton.http_url, *members_http, s.triton.metrics_url, s.redis.url):
        m = re.fullmatch(r"\w+://(?::([^@]*)@)?([\w.-]+):(\d+)(/.*)?", url)
        assert m, url
        service_port(objs, m.group(2), int(m.group(3)))
    assert s.redis.url.startswith(f"redis://:{SECRET_VALUE}@")  # the password reaches the URL
    # Settings name paths that the pod mounts (and can write, for the spool).
    mounts = {m["mountPath"]: m for m in container(objs, "gateway", "gateway")["volumeMounts"]}
    assert str(s.routing.routes_dir) in mounts
    assert not mounts[str(s.predlog.spool_dir)].get("readOnly", False)
    assert s.routing.load_versions is False  # model control would reach one replica only


def test_gateway_drains_before_it_stops(rendered) -> None:
    objs = rendered["cpu"]
    settings = gateway_settings(objs)
    pod = one(objs, "Deployment", "gateway")["spec"]["template"]["spec"]
    gw = container(objs, "gateway", "gateway")
    cmd = gw["lifecycle"]["preStop"]["exec"]["command"]
    assert cmd[0] == "sleep"
    total = float(cmd[1]) + settings.server.shutdown_timeout_s
    assert total < pod["terminationGracePeriodSeconds"], "SIGKILL would cut the drain short"
    assert gw["resources"]["requests"]["cpu"] and gw["resources"]["limits"]["memory"]


def test_gateway_pods_are_hardened_and_spread(rendered) -> None:
    objs = rendered["cpu"]
    for name in ("gateway", "triton", "triton-fallback", "redis", "prometheus", "archiver"):
        (workload,) = [o for o in objs if o["kind"] in WORKLOADS and o["metadata"]["name"] == name]
        template = template_of(workload)
        assert template["spec"]["securityContext"]["runAsNonRoot"] is True, name
        for c in containers(template):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, f"{name}/{c['name']}"
            assert sc["allowPrivilegeEscalation"] is False, f"{name}/{c['name']}"
            assert sc["capabilities"]["drop"] == ["ALL"], f"{name}/{c['name']}"
            assert "requests" in c["resources"], f"{name}/{c['name']}"
    dep = one(objs, "Deployment", "gateway")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    spread = dep["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert {t["topologyKey"] for t in spread} == {
        "kubernetes.io/hostname",
        "topology.kubernetes.io/zone",
    }
    assert all(selects(t["labelSelector"], labels) for t in spread)
    pdb = one(objs, "PodDisruptionBudget", "gateway")
    assert selects(pdb["spec"]["selector"], labels)


#: Volume sources Pod Security "restricted" admits.
RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
    "projected", "secret",
}  # fmt: skip


def restricted_violations(template: Obj) -> list[str]:
    """What Pod Security "restricted" would refuse in a pod template (the checks that apply
    to these manifests: users, privilege, capabilities, seccomp, volume types, host access)."""
    spec, found = template["spec"], []
    pod_sc = spec.get("securityContext", {})
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            found.append(key)
    for v in spec.get("volumes", []):
        if not set(v) - {"name"} <= RESTRICTED_VOLUMES:
            found.append(f"volume {v['name']}: {sorted(set(v) - {'name'})}")
    for c in containers(template):
        sc = {**pod_sc, **c.get("securityContext", {})}
        where = c["name"]
        if sc.get("runAsNonRoot") is not True or sc.get("runAsUser") == 0:
            found.append(f"{where}: may run as root")
        if sc.get("privileged") or sc.get("allowPrivilegeEscalation") is not False:
            found.append(f"{where}: privilege escalation")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []) or set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{where}: capabilities {caps}")
        if sc.get("seccompProfile", {}).get("type") not in ("RuntimeDefault", "Localhost"):
            found.append(f"{where}: seccomp")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            found.append(f"{where}: hostPort")
    return found


def test_pods_pass_the_pod_security_level_of_their_namespace(rendered) -> None:
    for overlay, objs in rendered.items():
        labels = one(objs, "Namespace", NAMESPACE)["metadata"]["labels"]
        level = labels["pod-security.kubernetes.io/enforce"]
        assert level == ("privileged" if overlay == "gpu-shared" else "restricted"), overlay
        if level != "restricted":
            continue
        for workload, template in pod_specs(objs):
            found = restricted_violations(template)
            assert not found, f"{overlay}: {workload['metadata']['name']}: {found}"
    # The checker itself: gpu-shared's pods are the ones it must refuse.
    pods = {w["metadata"]["name"]: t for w, t in pod_specs(rendered["gpu-shared"])}
    assert restricted_violations(pods["mps-control-daemon"])
    assert any("volume" in f for f in restricted_violations(pods["triton"]))


def test_hpa_scales_the_gateway_on_cpu_and_in_flight_requests(rendered) -> None:
    adapter = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    served = {r["name"]["as"] for r in adapter["rules"]["custom"]}
    for overlay, objs in rendered.items():
        hpa = one(objs, "HorizontalPodAutoscaler", "gateway")["spec"]
        target = hpa["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("Deployment", "gateway")
        assert find(objs, "Deployment", "gateway"), overlay
        # The autoscaler owns the replica count; a fixed one would undo it on every apply.
        assert "replicas" not in one(objs, "Deployment", "gateway")["spec"]
        assert hpa["minReplicas"] >= 2  # with the PDB's maxUnavailable 1: never zero
        by_type = {m["type"]: m for m in hpa["metrics"]}
        assert by_type["Resource"]["resource"]["name"] == "cpu"
        assert by_type["Pods"]["pods"]["metric"]["name"] in served


def test_gateway_exports_the_gauge_the_hpa_scales_on() -> None:
    adapter = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    exported = {
        line.split(b" ")[2].decode()
        for line in Metrics().render().splitlines()
        if line.startswith(b"# TYPE ")
    }
    assert rule["name"]["as"] in exported


def test_routes_configmap_is_every_route_file_mounted_as_a_directory(rendered) -> None:
    files = {p.name: p.read_text() for p in (ROOT / "configs" / "routes").glob("*.yaml")}
    for overlay, objs in rendered.items():
        cm = one(objs, "ConfigMap", "switchyard-routes")  # no hash suffix: updated in place
        assert cm["data"] == files, f"{overlay}: configs/kustomization.yaml lists other files"
        pod = one(objs, "Deployment", "gateway")["spec"]["template"]["spec"]
        name = cm["metadata"]["name"]
        (volume,) = [v for v in pod["volumes"] if v.get("configMap", {}).get("name") == name]
        gw = container(objs, "gateway", "gateway")
        (mount,) = [m for m in gw["volumeMounts"] if m["name"] == volume["name"]]
        assert "subPath" not in mount  # the kubelet never updates a subPath mount
        assert mount["mountPath"] == str(gateway_settings(objs).routing.routes_dir)


# -- Triton, Redis, Prometheus ---------------------------------------------------------------


def test_triton_pools_mirror_compose(rendered) -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "WORKDIR /app" in dockerfile and "COPY model_repository ./model_repository" in dockerfile
    for overlay, objs in rendered.items():
        for pool in ("triton", "triton-fallback"):
            c = container(objs, pool, "triton")
            assert c["command"] == compose[pool]["command"], f"{overlay}: {pool}"
            assert c["image"] == compose[pool]["image"]
            # The model repository: copied from the gateway image into the volume Triton reads.
            init = container(objs, pool, "model-repository")
            assert init["command"][-2:] == ["/app/model_repository/.", "/models/"]
            shared = {m["name"] for m in init["volumeMounts"] if m["mountPath"] == "/models"}
            assert shared & {m["name"] for m in c["volumeMounts"] if m["mountPath"] == "/models"}
            svc = one(objs, "Service", pool)
            assert svc["spec"]["clusterIP"] == "None"
            labels = one(objs, "Deployment", pool)["spec"]["template"]["metadata"]["labels"]
            assert selects({"matchLabels": svc["spec"]["selector"]}, labels)
            others = [
                t["metadata"]["labels"] for w, t in pod_specs(objs) if w["metadata"]["name"] != pool
            ]
            assert not any(selects({"matchLabels": svc["spec"]["selector"]}, o) for o in others)


def test_network_policies_let_only_the_gateway_reach_triton_and_redis(rendered) -> None:
    for overlay, objs in rendered.items():
        pods = {w["metadata"]["name"]: t for w, t in pod_specs(objs)}
        policies = find(objs, "NetworkPolicy")
        for target in ("triton", "triton-fallback", "redis"):
            labels = pods[target]["metadata"]["labels"]
            mine = [p for p in policies if selects(p["spec"]["podSelector"], labels)]
            assert mine and all("Ingress" in p["spec"]["policyTypes"] for p in mine), target
            declared = {
                p["containerPort"] for c in containers(pods[target]) for p in c.get("ports", [])
            }
            for policy in mine:
                for rule in policy["spec"]["ingress"]:
                    ports = {p["port"] for p in rule["ports"]}
                    assert ports <= declared, f"{overlay}: {target}: {ports - declared}"
                    for peer in rule["from"]:
                        assert set(peer) == {"podSelector"}, f"{target}: {peer}"  # no ipBlock
                        admitted = {
                            n
                            for n, t in pods.items()
                            if selects(peer["podSelector"], t["metadata"]["labels"])
                        }
                        # Prometheus may scrape Triton's metrics port, the archiver read
                        # Redis; nothing else gets in.
                        allowed = ({"gateway"}, {"prometheus"}, {"archiver"})
                        assert admitted in allowed, f"{target}: {admitted}"
                        if admitted == {"prometheus"}:
                            assert ports == {8002}, f"{target}: Prometheus beyond metrics"
                        if admitted == {"archiver"}:
                            assert (target, ports) == ("redis", {6379}), f"archiver: {target}"


def test_redis_password_comes_from_a_secret(rendered) -> None:
    objs = rendered["cpu"]
    redis = container(objs, "redis", "redis")
    assert "--requirepass" in redis["args"]
    assert redis["args"][redis["args"].index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    secrets = {
        v["valueFrom"]["secretKeyRef"]["name"]
        for _, t in pod_specs(objs)
        for c in containers(t)
        for v in c.get("env", [])
        if "valueFrom" in v
    }
    secrets |= {
        v["secret"]["secretName"]
        for _, t in pod_specs(objs)
        for v in t["spec"].get("volumes", [])
        if "secret" in v
    }
    assert secrets == {"switchyard-redis", "switchyard-api-keys"}
    # No credentials ship in the repository: every Secret is created by the operator, and the
    # docs say how.
    assert not find(objs, "Secret")
    docs = (ROOT / "docs" / "kubernetes.md").read_text()
    for name in secrets:
        assert f"kubectl -n {NAMESPACE} create secret generic {name}" in docs, name


def relabel(configs: list[Obj], labels: dict[str, str]) -> dict[str, str] | None:
    """Prometheus relabelling, the two actions prometheus.yml uses (keep, replace)."""
    labels = dict(labels)
    for rc in configs:
        value = rc.get("separator", ";").join(labels.get(n, "") for n in rc["source_labels"])
        m = re.fullmatch(rc.get("regex", "(.*)"), value)
        action = rc.get("action", "replace")
        if action == "keep":
            if m is None:
                return None
        elif action == "replace":
            if m is not None:
                labels[rc["target_label"]] = m.expand(
                    rc.get("replacement", "$1").replace("$", "\\")
                )
        else:
            raise AssertionError(f"relabel action {action} not simulated")
    return labels


def sd_targets(objs: list[Obj]) -> Iterator[tuple[str, str, dict[str, str]]]:
    """(workload, port name, meta labels) of every container port, as kubernetes_sd_configs
    role: pod discovers them."""
    for workload, template in pod_specs(objs):
        pod_name = f"{workload['metadata']['name']}-0"
        meta = {"__meta_kubernetes_namespace": NAMESPACE, "__meta_kubernetes_pod_name": pod_name}
        for key, value in template["metadata"]["labels"].items():
            meta["__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)] = value
        for c in containers(template, init=False):
            for port in c.get("ports", []):
                yield (
                    workload["metadata"]["name"],
                    port["name"],
                    {
                        **meta,
                        "__meta_kubernetes_pod_container_port_name": port["name"],
                    },
                )


def prometheus_config(objs: list[Obj]) -> tuple[Obj, Obj]:
    """The rendered scrape config and rules ConfigMap (content-hashed names)."""
    cms = {c["metadata"]["name"].rsplit("-", 1)[0]: c for c in find(objs, "ConfigMap")}
    config = yaml.safe_load(cms["prometheus-config"]["data"]["prometheus.yml"])
    return config, cms["prometheus-rules"]


def test_prometheus_scrapes_every_gateway_and_triton_pod(rendered) -> None:
    for overlay, objs in rendered.items():
        config, _ = prometheus_config(objs)
        scraped: dict[str, set[tuple[str, str]]] = {}
        for job in config["scrape_configs"]:
            for workload, port, meta in sd_targets(objs):
                labels = relabel(job["relabel_configs"], meta)
                if labels is not None:
                    scraped.setdefault(job["job_name"], set()).add((workload, port))
                    # prometheus-adapter maps series to pods by these two labels.
                    assert labels["namespace"] == NAMESPACE and labels["pod"], job["job_name"]
        assert scraped == {
            "gateway": {("gateway", "http")},
            "triton": {("triton", "metrics"), ("triton-fallback", "metrics")},
        }, overlay


def test_prometheus_gets_the_repo_rules_and_a_valid_config(rendered, tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        unavailable("promtool not installed (make deps, or apt-get install prometheus)")
    objs = rendered["cpu"]
    prom, rules = prometheus_config(objs)
    assert rules["data"] == {"rules.yml": (ROOT / "configs/prometheus/rules.yml").read_text()}
    c = container(objs, "prometheus", "prometheus")
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    pod = one(objs, "Deployment", "prometheus")["spec"]["template"]["spec"]
    by_cm = {v["configMap"]["name"]: v["name"] for v in pod["volumes"] if "configMap" in v}
    assert prom["rule_files"] == [f"{mounts[by_cm[rules['metadata']['name']]]}/rules.yml"]
    # Debian's promtool is built without Kubernetes service discovery, so it checks the rest
    # of the config with static targets in its place (the relabelling is simulated above);
    # and it reads the rule files too, so it gets a copy of the rendered one.
    for job in prom["scrape_configs"]:
        job["static_configs"] = [{"targets": ["127.0.0.1:1"]}]
        del job["kubernetes_sd_configs"]
    (tmp_path / "rules.yml").write_text(rules["data"]["rules.yml"])
    prom["rule_files"] = [str(tmp_path / "rules.yml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(prom))
    done = subprocess.run(
        [promtool, "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 1 rule files found" in done.stdout + done.stderr


# -- the overlays ----------------------------------------------------------------------------


def gpus(c: Obj) -> tuple[Any, Any]:
    res = c.get("resources", {})
    return res.get("requests", {}).get("nvidia.com/gpu"), res.get("limits", {}).get(
        "nvidia.com/gpu"
    )


def test_only_the_gpu_overlays_request_gpus(rendered) -> None:
    for overlay, objs in rendered.items():
        for workload, template in pod_specs(objs):
            name = workload["metadata"]["name"]
            for c in containers(template):
                primary = overlay in GPU_OVERLAYS and (name, c["name"]) == ("triton", "triton")
                expected = (1, 1) if primary else (None, None)
                assert gpus(c) == expected, f"{overlay}: {name}/{c['name']}"
            if overlay in GPU_OVERLAYS and name == "triton":
                spec = template["spec"]
                assert spec["nodeSelector"]["nvidia.com/gpu.present"] == "true"
                assert {t["key"] for t in spec["tolerations"]} == {"nvidia.com/gpu"}
                # No spare GPU to surge onto: roll one pod at a time.
                assert workload["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0


def test_gpu_shared_runs_triton_under_an_mps_control_daemon(rendered) -> None:
    objs = rendered["gpu-shared"]
    assert not find(rendered["gpu-dedicated"], "DaemonSet")
    ds = one(objs, "DaemonSet", "mps-control-daemon")
    daemon = container(objs, "mps-control-daemon", "mps-control-daemon")
    assert "nvidia-cuda-mps-control -f" in " ".join(daemon["command"])
    denv = expanded_env(daemon)
    triton = container(objs, "triton", "triton")
    tenv = expanded_env(triton)
    assert 0 < int(tenv["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"]) <= 100

    def host_path(template: Obj, c: Obj, mount_path: str) -> str:
        (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == mount_path]
        (vol,) = [v for v in template["spec"]["volumes"] if v["name"] == mount["name"]]
        assert set(vol) == {"name", "hostPath"}, vol  # one volume source only
        return str(vol["hostPath"]["path"])

    tpl = one(objs, "Deployment", "triton")["spec"]["template"]
    dtpl = ds["spec"]["template"]
    # Same pipe directory and the same /dev/shm on the host, seen by both.
    assert host_path(tpl, triton, tenv["CUDA_MPS_PIPE_DIRECTORY"]) == host_path(
        dtpl, daemon, denv["CUDA_MPS_PIPE_DIRECTORY"]
    )
    assert host_path(tpl, triton, "/dev/shm") == host_path(dtpl, daemon, "/dev/shm")
    # Triton lands only where the daemon runs.
    node = tpl["spec"]["nodeSelector"]
    assert dtpl["spec"]["nodeSelector"].items() <= node.items()


# -- the prediction archive ------------------------------------------------------------------


def test_archiver_cronjob_runs_the_archive_command_once_on_its_volume(rendered) -> None:
    from gateway.cli import build_parser

    for overlay, objs in rendered.items():
        cron = one(objs, "CronJob", "archiver")["spec"]
        assert cron["concurrencyPolicy"] == "Forbid", overlay  # one consumer at a time
        c = container(objs, "archiver", "archiver")
        assert c["image"] == container(objs, "gateway", "gateway")["image"]
        args = build_parser().parse_args(c["command"][3:])  # the real CLI takes the command
        assert args.handler.__name__ == "cmd_predlog_archive" and args.once
        s = settings_of(c)
        gw = gateway_settings(objs)
        assert s.redis.url == gw.redis.url
        assert s.predlog.stream_prefix == gw.predlog.stream_prefix
        m = re.fullmatch(r"redis://:[^@]*@([\w.-]+):(\d+)/\d+", s.redis.url)
        assert m, s.redis.url
        service_port(objs, m.group(1), int(m.group(2)))
        # The archive directory is a writable mount of the archive's claim.
        template = template_of(one(objs, "CronJob", "archiver"))
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        mount = mounts[str(s.archive.dir)]
        assert not mount.get("readOnly", False)
        (volume,) = [v for v in template["spec"]["volumes"] if v["name"] == mount["name"]]
        claim = volume["persistentVolumeClaim"]["claimName"]
        assert find(objs, "PersistentVolumeClaim", claim), claim
        assert template["spec"]["restartPolicy"] in ("Never", "OnFailure")
