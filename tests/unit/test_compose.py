"""docker-compose.yml cannot run here (no Docker engine), so it is checked statically: every
file, image, port, healthcheck and service reference must be real."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import load_settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def container_ports(svc: dict[str, Any]) -> set[int]:
    """Ports a service listens on: published or exposed container ports, --*-port= flags."""
    ports = {int(str(p).split(":")[-1].split("/")[0]) for p in svc.get("ports", [])}
    ports |= {int(str(p).split("/")[0]) for p in svc.get("expose", [])}
    for arg in svc.get("command", []) or []:
        m = re.fullmatch(r"--[a-z-]*port=(\d+)", str(arg))
        if m:
            ports.add(int(m.group(1)))
    return ports


def test_every_image_is_pinned_and_every_build_exists(compose) -> None:
    for name, svc in services(compose).items():
        assert "image" in svc or "build" in svc, name
        if "image" in svc:
            image = svc["image"]
            assert ":" in image and not image.endswith(":latest"), f"{name}: unpinned {image}"
        if "build" in svc:
            build = svc["build"]
            context = ROOT / (build["context"] if isinstance(build, dict) else build)
            dockerfile = (
                build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile"
            )
            assert (context / dockerfile).is_file(), f"{name}: no {dockerfile}"


def test_every_bind_mount_source_exists(compose) -> None:
    named = set(compose.get("volumes") or {})
    for name, svc in services(compose).items():
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name}: missing {source}"
            else:
                assert source in named, f"{name}: undeclared volume {source}"


def test_every_service_has_a_healthcheck_and_dependencies_exist(compose) -> None:
    svcs = services(compose)
    for name, svc in svcs.items():
        hc = svc.get("healthcheck")
        assert hc and hc["test"][0] in ("CMD", "CMD-SHELL"), f"{name}: no healthcheck"
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in svcs, f"{name} depends on unknown {dep}"
            assert cond["condition"] == "service_healthy"


def test_host_ports_are_unique(compose) -> None:
    published = [
        str(p).split(":")[0] for s in services(compose).values() for p in s.get("ports", [])
    ]
    assert len(published) == len(set(published))


def test_gateway_env_is_valid_settings_pointing_at_real_services(compose) -> None:
    svcs = services(compose)
    env = {k: str(v) for k, v in svcs["gateway"]["environment"].items()}
    settings = load_settings(ROOT / "configs" / "gateway.yaml", env=env, base_dir=ROOT)
    for key, value in env.items():
        m = re.search(r"^(?:[a-z]+://)?([a-z][a-z0-9_-]*):(\d+)", value)
        if m and key.endswith("_URL"):
            host, port = m.group(1), int(m.group(2))
            assert host in svcs, f"{key} names unknown service {host}"
            assert port in container_ports(svcs[host]), f"{key}: {host} does not listen on {port}"
    assert settings.triton.grpc_url == "triton:8001"
    published = container_ports(svcs["gateway"])
    assert {settings.server.port, settings.server.grpc_port} <= published  # REST and gRPC
    for server in settings.triton.servers:
        host, port = server.grpc_url.split(":")
        assert host in svcs and int(port) in container_ports(svcs[host]), server
        for model in server.models:
            assert f"--load-model={model}" in svcs[host]["command"], (host, model)
    assert {s.name for s in settings.triton.servers} == {"primary", "fallback"}
    command = svcs["gateway"]["command"]
    config = command[command.index("--config") + 1]
    assert (ROOT / config).is_file()


def test_triton_serves_the_mounted_repository(compose) -> None:
    for name, svc in services(compose).items():
        if "tritonserver" not in svc.get("image", ""):
            continue
        args = svc["command"]
        repo = next(a.split("=", 1)[1] for a in args if a.startswith("--model-repository="))
        mounts = {v.split(":")[1]: v.split(":")[0] for v in svc["volumes"]}
        assert repo in mounts, f"{name}: {repo} is not mounted"
        assert (ROOT / mounts[repo]).is_dir()
        for arg in args:
            if arg.startswith("--load-model=") and arg != "--load-model=*":
                model = arg.split("=", 1)[1]
                assert (ROOT / mounts[repo] / model / "config.pbtxt").is_file(), model


def test_prometheus_in_compose_scrapes_compose_services(compose) -> None:
    svcs = services(compose)
    prom = svcs["prometheus"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in prom["volumes"]}
    config = yaml.safe_load((ROOT / mounts["/etc/prometheus/prometheus.yml"]).read_text())
    for rule_file in config["rule_files"]:
        assert f"/etc/prometheus/{rule_file}" in mounts, rule_file
    targets = [
        t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    ]
    assert targets
    for target in targets:
        host, port = target.split(":")
        assert host in svcs and int(port) in container_ports(svcs[host]), target


def test_grafana_provisioning_points_at_compose_prometheus(compose) -> None:
    grafana = services(compose)["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    ds_file = mounts["/etc/grafana/provisioning/datasources/prometheus.yml"]
    ds = yaml.safe_load((ROOT / ds_file).read_text())["datasources"][0]
    assert ds["url"] == "http://prometheus:9090"
    providers = yaml.safe_load(
        (ROOT / mounts["/etc/grafana/provisioning/dashboards"] / "switchyard.yml").read_text()
    )["providers"]
    dashboards_dir = providers[0]["options"]["path"]
    assert dashboards_dir in mounts and list((ROOT / mounts[dashboards_dir]).glob("*.json"))


def test_make_run_binds_loopback_and_the_container_binds_every_interface(compose) -> None:
    """configs/gateway.yaml (make run) listens on 127.0.0.1 with auth off; compose and the
    image override the bind to 0.0.0.0 so the published port reaches the gateway, and compose
    turns auth on with the key file on a volume (keys survive a container restart)."""
    local = load_settings(ROOT / "configs" / "gateway.yaml", env={}, base_dir=ROOT)
    assert local.server.host == "127.0.0.1" and not local.auth.enabled
    env = {k: str(v) for k, v in services(compose)["gateway"]["environment"].items()}
    container = load_settings(ROOT / "configs" / "gateway.yaml", env=env, base_dir=ROOT)
    assert container.server.host == "0.0.0.0"
    assert container.auth.enabled  # reachable from the network: keys required
    volumes = services(compose)["gateway"]["volumes"]
    assert any(v.endswith(":" + str(container.auth.keys_file.parent)) for v in volumes)
    assert "ENV SWITCHYARD__SERVER__HOST=0.0.0.0" in (ROOT / "Dockerfile").read_text()


def test_only_the_gateway_and_grafana_are_published(compose) -> None:
    """Triton's ports (model control: anyone could unload models), Redis and Prometheus stay
    inside the compose network."""
    svcs = services(compose)
    assert {name for name, svc in svcs.items() if svc.get("ports")} == {"gateway", "grafana"}
    for name in ("triton", "triton-fallback"):
        assert {8000, 8001, 8002} <= container_ports(svcs[name]), name


def _mounts(svc: dict[str, Any]) -> dict[str, str]:
    """Container path -> volume name (or host path) of each mount."""
    return {v.split(":")[1]: v.split(":")[0] for v in svc.get("volumes", [])}


def test_redis_requires_the_password_the_gateway_reads_from_a_file(compose) -> None:
    svcs = services(compose)
    redis, gateway = svcs["redis"], svcs["gateway"]
    script = "\n".join(map(str, redis["command"]))
    assert "requirepass" in script and "redis-server" in script
    assert "REDISCLI_AUTH" in redis["healthcheck"]["test"][1]  # the probe authenticates too
    env = {k: str(v) for k, v in gateway["environment"].items()}
    settings = load_settings(ROOT / "configs" / "gateway.yaml", env=env, base_dir=ROOT)
    secret = settings.redis.password_file
    assert secret is not None and str(secret) in script  # the file redis-server reads
    directory = str(secret.parent)
    assert _mounts(redis)[directory] == _mounts(gateway)[directory]  # one volume, shared
    assert any(v.endswith(f"{directory}:ro") for v in gateway["volumes"])  # read-only there
    assert "@" not in settings.redis.url  # no password in the url
