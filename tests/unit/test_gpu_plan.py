"""The GPU placement planner on synthetic inventories: the decision, its refusals, its inputs
(manifests, route SLOs, inventory, pynvml) and the files it writes."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.cli import main
from gateway.config import load_settings
from gateway.placement import deploy, render
from gateway.placement.plan import (
    GIB,
    Gpu,
    ModelDemand,
    OverCommitted,
    PlacementError,
    PlanPolicy,
    mps_shares,
    plan,
)
from gateway.placement.sources import detect_gpus, load_demands, read_inventory, route_p99

ROOT = Path(__file__).resolve().parents[2]


def gpus(*sizes_gib: float, name: str = "NVIDIA L4") -> list[Gpu]:
    return [Gpu(i, name, int(s * GIB)) for i, s in enumerate(sizes_gib)]


def model(name: str, gib: float, p99: float | None = None, **kw: Any) -> ModelDemand:
    return ModelDemand(name, int(gib * GIB), p99_ms=p99, **kw)


# -- the decision --------------------------------------------------------------------------
def test_strict_models_get_dedicated_gpus_and_small_ones_share_under_mps() -> None:
    result = plan(
        [model("fraud", 6, p99=20), model("a", 1), model("b", 2), model("c", 1, p99=200)],
        gpus(24, 24),
    )
    dedicated, shared = result.gpus
    assert dedicated.mode == "dedicated" and [a.model for a in dedicated.assignments] == ["fraud"]
    assert dedicated.assignments[0].mps_thread_pct is None and not dedicated.mps
    assert shared.mode == "shared" and shared.mps
    assert [a.model for a in shared.assignments] == ["a", "b", "c"]
    assert all(a.mps_thread_pct == 33 for a in shared.assignments)


def test_strict_threshold_is_configurable() -> None:
    models = [model("a", 1, p99=80), model("b", 1, p99=80)]
    assert {g.mode for g in plan(models, gpus(24, 24)).gpus} == {"shared", "idle"}
    strict = plan(models, gpus(24, 24), PlanPolicy(strict_p99_ms=100))
    assert [g.mode for g in strict.gpus] == ["dedicated", "dedicated"]


def test_a_strict_model_takes_the_smallest_gpu_that_holds_it() -> None:
    result = plan([model("big", 60, p99=10), model("small", 10, p99=10)], gpus(80, 24, 141))
    placed = {a.model: a.gpu for a in result.assignments()}
    assert placed == {"big": 0, "small": 1}  # the 141 GiB GPU stays free
    assert result.gpus[2].mode == "idle"


def test_packed_models_fill_the_fullest_gpu_that_fits_first() -> None:
    result = plan([model(f"m{i}", 5) for i in range(5)], gpus(24, 24))
    by_gpu = {g.gpu.index: [a.model for a in g.assignments] for g in result.gpus}
    # 21.6 GiB usable per GPU: four 5 GiB models on GPU 0, the fifth spills to GPU 1
    assert by_gpu == {0: ["m0", "m1", "m2", "m3"], 1: ["m4"]}
    assert not result.gpus[1].mps and result.gpus[1].assignments[0].mps_thread_pct is None


def test_instances_multiply_the_footprint() -> None:
    with pytest.raises(OverCommitted):
        plan([model("m", 6, instances=4)], gpus(24))
    assert plan([model("m", 6, instances=3)], gpus(24)).gpus[0].used_bytes == 18 * GIB


@pytest.mark.parametrize(
    ("loads", "expected"),
    [
        (None, {"a": 33, "b": 33, "c": 33}),
        ({"a": 600.0, "b": 300.0, "c": 100.0}, {"a": 60, "b": 30, "c": 10}),
        ({"a": 1.0, "b": 1.0, "c": 1e9}, {"a": 1, "b": 1, "c": 98}),  # 1 % floor each
    ],
)
def test_mps_shares_sum_to_at_most_100(loads: dict[str, float] | None, expected: dict) -> None:
    models = [model(n, 1, load=None if loads is None else loads[n]) for n in "abc"]
    result = plan(models, gpus(24))
    assert result.share_basis == ("equal" if loads is None else "load")
    got = {a.model: a.mps_thread_pct for a in result.gpus[0].assignments}
    assert got == expected
    assert sum(got.values()) <= 100


def test_mps_shares_stay_within_100_for_many_skewed_models() -> None:
    rng = random.Random(7)
    for n in (2, 7, 48, 100):
        loads = [rng.choice([0.001, 1.0, 1e6]) for _ in range(n)]
        ms = [model(f"m{i}", 0.1, load=w) for i, w in enumerate(loads)]
        pct = mps_shares(ms, "load")
        assert sum(pct.values()) <= 100 and min(pct.values()) >= 1, n


def test_load_for_some_packed_models_only_is_refused() -> None:
    with pytest.raises(PlacementError, match="not for b"):
        plan([model("a", 1, load=10.0), model("b", 1)], gpus(24))


def test_over_commit_message_names_the_closest_gpu_and_how_much() -> None:
    with pytest.raises(OverCommitted) as err:
        plan([model("a", 12), model("b", 12), model("c", 12)], gpus(24, 16, name="NVIDIA A10"))
    exc = err.value
    assert exc.model == "c" and exc.gpu == 0
    # GPU 0: 21.6 GiB usable, 12 used -> 9.6 free; c needs 12 -> short by 2.4 GiB
    assert exc.shortfall == 12 * GIB - (int(24 * GIB * 0.9) - 12 * GIB)
    assert "GPU 0 (NVIDIA A10)" in str(exc) and "short by 2.4 GiB" in str(exc)


def test_mps_client_limit_spills_to_the_next_gpu_then_refuses() -> None:
    policy = PlanPolicy(max_mps_clients=2)
    result = plan([model(n, 1) for n in "abc"], gpus(24, 24), policy)
    assert [len(g.assignments) for g in result.gpus] == [2, 1]
    with pytest.raises(PlacementError, match="already runs 2 MPS clients"):
        plan([model(n, 1) for n in "abcde"], gpus(24, 24), policy)


def test_headroom_is_configurable() -> None:
    models = [model("m", 23)]
    with pytest.raises(OverCommitted, match="less 10% headroom"):
        plan(models, gpus(24))
    assert plan(models, gpus(24), PlanPolicy(headroom=0.02)).gpus[0].used_bytes == 23 * GIB


def test_a_strict_model_too_big_for_every_free_gpu_is_refused() -> None:
    with pytest.raises(OverCommitted, match=r"model 'llm'.*GPU 1"):
        plan([model("llm", 30, p99=20)], gpus(16, 24))


def test_more_strict_models_than_gpus_is_refused() -> None:
    with pytest.raises(PlacementError, match=r"3 models have a strict p99.*inventory has 2"):
        plan([model(n, 1, p99=10) for n in "abc"], gpus(80, 80))


def test_packed_models_with_every_gpu_dedicated_are_refused() -> None:
    with pytest.raises(PlacementError, match="none is left for c"):
        plan([model("a", 1, p99=10), model("b", 1, p99=10), model("c", 1)], gpus(80, 80))


def test_the_plan_does_not_depend_on_input_order() -> None:
    ms = [
        model("s1", 3, p99=10),
        model("s2", 9, p99=20),
        *(model(f"p{i}", i % 3 + 1) for i in range(9)),
    ]
    inv = gpus(24, 48, 24, 80)
    first = render.files(plan(ms, inv))
    rng = random.Random(1)
    for _ in range(5):
        rng.shuffle(ms)
        rng.shuffle(inv)
        assert render.files(plan(ms, inv)) == first


# -- inputs --------------------------------------------------------------------------------
def write_model(repo: Path, name: str, versions: dict[str, int | None], keep: int = 10) -> None:
    """A model folder: config.pbtxt, and per version a weights file and a manifest (with a
    memory_footprint_bytes when the value is not None)."""
    d = repo / name
    d.mkdir(parents=True)
    (d / "config.pbtxt").write_text(
        f'name: "{name}"\nbackend: "python"\nmax_batch_size: 8\n'
        f"version_policy: {{ latest: {{ num_versions: {keep} }} }}\n"
        "instance_group [ { kind: KIND_CPU, count: 2 } ]\n"
    )
    for v, footprint in versions.items():
        (d / v).mkdir()
        (d / v / "weights.npz").write_bytes(b"x" * 1000)
        manifest: dict[str, Any] = {"model": name, "files": {"weights.npz": "0" * 64}}
        if footprint is not None:
            manifest["memory_footprint_bytes"] = footprint
        (d / v / "manifest.json").write_text(json.dumps(manifest))


def test_footprint_from_the_manifest_or_estimated_from_artifacts(tmp_path: Path) -> None:
    write_model(tmp_path, "declared", {"1": 3 * GIB, "2": 2 * GIB})
    write_model(tmp_path, "guessed", {"1": None})
    write_model(tmp_path, "latest_only", {"1": GIB, "2": GIB, "3": GIB}, keep=2)
    got = {d.name: d for d in load_demands(tmp_path, {}, context_bytes=100 << 20)}
    assert got["declared"].instance_bytes == 5 * GIB and got["declared"].footprint == "manifest"
    assert got["declared"].instances == 2  # from the config's instance_group
    assert got["declared"].memory_bytes == 10 * GIB
    assert got["guessed"].instance_bytes == (100 << 20) + 2 * 1000
    assert got["guessed"].footprint == "estimate"
    assert got["latest_only"].versions == ("2", "3")  # version_policy latest 2


def test_instances_and_load_overrides_must_name_real_models(tmp_path: Path) -> None:
    write_model(tmp_path, "m", {"1": GIB})
    (d,) = load_demands(tmp_path, {}, loads={"m": 5.0}, instances={"m": 3})
    assert (d.instances, d.load) == (3, 5.0)
    with pytest.raises(PlacementError, match="nope"):
        load_demands(tmp_path, {}, loads={"nope": 1.0})


def test_a_bad_footprint_in_a_manifest_is_refused(tmp_path: Path) -> None:
    write_model(tmp_path, "m", {"1": -5})
    with pytest.raises(PlacementError, match="memory_footprint_bytes"):
        load_demands(tmp_path, {})


def test_route_p99_counts_answering_targets_only(tmp_path: Path) -> None:
    (tmp_path / "fast.yaml").write_text(
        "model: fast\nchampion: {target: a, version: '1'}\n"
        "challengers: [{target: b, version: '1', weight: 5}]\n"
        "shadow: [{target: s, version: '1', sample: 0.1}]\n"
        "fallback: {target: f, version: '1'}\nslo: {p99_ms: 30}\n"
    )
    (tmp_path / "slow.yaml").write_text(
        "model: slow\nchampion: {target: a, version: '2'}\nslo: {p99_ms: 300}\n"
    )
    assert route_p99(tmp_path) == {"a": 30.0, "b": 30.0}


def test_inventory_file(tmp_path: Path) -> None:
    assert read_inventory(ROOT / "configs/examples/gpu-inventory.yaml")[1].name == "NVIDIA H200"
    bad = tmp_path / "bad.yaml"
    bad.write_text("- {index: 0, name: x}\n")
    with pytest.raises(PlacementError, match="memory_bytes"):
        read_inventory(bad)


class FakeNvml:
    class Mem:
        total = 80 * GIB

    def __init__(self, count: int) -> None:
        self.count, self.shut = count, False

    def nvmlInit(self) -> None: ...

    def nvmlShutdown(self) -> None:
        self.shut = True

    def nvmlDeviceGetCount(self) -> int:
        return self.count

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetName(self, h: int) -> bytes:
        return b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Mem:
        return self.Mem()


def test_gpus_from_pynvml() -> None:
    nvml = FakeNvml(2)
    name = "NVIDIA H100 80GB HBM3"
    assert detect_gpus(nvml) == [Gpu(0, name, 80 * GIB), Gpu(1, name, 80 * GIB)]
    assert nvml.shut


# -- outputs -------------------------------------------------------------------------------
def sample_plan() -> Any:
    return plan(
        [model("fraud", 6, p99=20), model("risk_v", 1, load=300.0), model("b", 2, load=100.0)],
        gpus(24, 24),
    )


def test_compose_override_pins_devices_and_feeds_the_gateway_valid_settings() -> None:
    override = deploy.compose_override(sample_plan())
    svcs = override["services"]
    assert sorted(svcs) == ["gateway", "triton-gpu0-fraud", "triton-gpu1-b", "triton-gpu1-risk-v"]
    devices = {
        n: s["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]
        for n, s in svcs.items()
        if n != "gateway"
    }
    assert devices == {
        "triton-gpu0-fraud": ["0"],
        "triton-gpu1-b": ["1"],
        "triton-gpu1-risk-v": ["1"],
    }
    assert "environment" not in svcs["triton-gpu0-fraud"]  # dedicated: no MPS
    assert svcs["triton-gpu1-risk-v"]["environment"]["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "75"
    assert svcs["triton-gpu1-b"]["environment"]["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "25"
    assert "--load-model=risk_v" in svcs["triton-gpu1-risk-v"]["command"]
    settings = load_settings(env=svcs["gateway"]["environment"])
    served = {m: s.grpc_url for s in settings.triton.servers for m in s.models}
    assert served == {"fraud": "triton-gpu0-fraud:8001", "b": "triton-gpu1-b:8001",
                      "risk_v": "triton-gpu1-risk-v:8001"}  # fmt: skip
    assert set(svcs["gateway"]["depends_on"]) == set(svcs) - {"gateway"}


def test_k8s_overlays_split_dedicated_and_shared() -> None:
    out = deploy.k8s_overlays(sample_plan())
    assert sorted(out) == [
        "k8s/gpu-dedicated/gateway-servers-patch.yaml",
        "k8s/gpu-dedicated/kustomization-placement.yaml",
        "k8s/gpu-dedicated/triton-gpu0-fraud.yaml",
        "k8s/gpu-shared/gateway-servers-patch.yaml",
        "k8s/gpu-shared/kustomization-placement.yaml",
        "k8s/gpu-shared/triton-gpu1-b.yaml",
        "k8s/gpu-shared/triton-gpu1-risk-v.yaml",
    ]
    dep, svc = yaml.safe_load_all(out["k8s/gpu-shared/triton-gpu1-risk-v.yaml"])
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert {e["name"]: e["value"] for e in c["env"]}["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "75"
    assert c["resources"]["limits"] == {"nvidia.com/gpu": 1}
    assert dep["spec"]["template"]["spec"]["hostIPC"] is True
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    dedicated, _ = yaml.safe_load_all(out["k8s/gpu-dedicated/triton-gpu0-fraud.yaml"])
    assert "env" not in dedicated["spec"]["template"]["spec"]["containers"][0]
    kust = yaml.safe_load(out["k8s/gpu-shared/kustomization-placement.yaml"])
    assert kust["resources"] == ["triton-gpu1-b.yaml", "triton-gpu1-risk-v.yaml"]
    patch = yaml.safe_load(out["k8s/gpu-dedicated/gateway-servers-patch.yaml"])
    env = patch["spec"]["template"]["spec"]["containers"][0]["env"][0]
    assert [s["models"] for s in json.loads(env["value"])] == [["fraud"]]


def test_instance_group_blocks_parse_as_triton_config() -> None:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    for a in sample_plan().assignments():
        for host in (True, False):
            cfg = text_format.Parse(render.instance_group(a, host), model_config_pb2.ModelConfig())
            (group,) = cfg.instance_group
            assert group.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
            assert group.count == a.instances
            assert list(group.gpus) == ([a.gpu] if host else [])


# -- the command ---------------------------------------------------------------------------
def test_cli_plans_the_shipped_repository_on_the_sample_inventory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["gpu", "plan", "--inventory", str(ROOT / "configs/examples/gpu-inventory.yaml"),
            "--model-repository", str(ROOT / "model_repository"),
            "--routes-dir", str(ROOT / "configs/routes")]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    text = capsys.readouterr().out
    assert "GPU 0 NVIDIA H200: shared (MPS)" in text and "footprint estimated" in text
    assert "equal share" in text
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.*"))
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.*"))
    assert files_a == files_b and Path("docker-compose.gpu.yml") in files_a
    for rel in files_a:  # deterministic, byte for byte
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    planned = json.loads((tmp_path / "a/plan.json").read_text())
    assert {m["model"] for m in planned["models"]} == {"risk", "digits", "risk_distilled"}


def test_cli_refuses_an_over_committed_plan_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inv = tmp_path / "tiny.yaml"
    inv.write_text("- {index: 0, name: Tiny GPU, memory_bytes: 1073741824}\n")
    repo, routes, out = ROOT / "model_repository", ROOT / "configs/routes", tmp_path / "o"
    code = main(["gpu", "plan", "--inventory", str(inv), "--model-repository", str(repo),
                 "--routes-dir", str(routes), "--out", str(out)])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "over-committed" in err and "GPU 0 (Tiny GPU)" in err and "short by" in err
    assert not (tmp_path / "o").exists()  # nothing written for a refused plan


def test_readme_shows_the_planners_real_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```console\n$ python -m gateway gpu plan", 1)[1].split("```", 1)[0]
    shown = block.split("\n$ ", 1)[0].splitlines()[2:]  # after the two command lines
    assert shown[-1] == "wrote 11 files under var/gpu-plan"
    inv = str(ROOT / "configs/examples/gpu-inventory.yaml")
    loads = ["--load", "risk=800", "--load", "digits=150", "--load", "risk_distilled=50"]
    code = main(["gpu", "plan", "--inventory", inv, *loads, "--out", str(tmp_path),
                 "--model-repository", str(ROOT / "model_repository"),
                 "--routes-dir", str(ROOT / "configs/routes")])  # fmt: skip
    assert code == 0
    assert capsys.readouterr().out.splitlines()[:-1] == shown[:-1]
