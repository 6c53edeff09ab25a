"""Load-aware routing: Triton's scraped load, power of two choices, members joining and
draining at run time (config or DNS), and the client-side maximum channel age."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import numpy as np
from aiohttp import ClientSession, web
from tritonclient.grpc import service_pb2, service_pb2_grpc

from gateway.backends.discovery import DnsDiscovery, DnsSource
from gateway.backends.load import ServerLoad, load_score
from gateway.backends.pool import BackendPool, PoolMember
from gateway.backends.triton import TritonBackend
from gateway.clock import FakeClock
from gateway.errors import BackendUnavailable
from gateway.triton_metrics import ServerCounters, parse_server_counters
from gateway.types import Deadline, InferRequest, Tensor
from tests.unit.fake_backend import FakeBackend
from tests.unit.fakes import toy_backend

ROOT = Path(__file__).resolve().parents[2]
SCRAPE = """\
# HELP nv_inference_pending_request_count Instantaneous number of pending requests
# TYPE nv_inference_pending_request_count gauge
nv_inference_pending_request_count{model="risk",version="2"} 3
nv_inference_pending_request_count{model="digits",version="1"} 1
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="risk",version="2"} 100
nv_inference_request_success{model="digits",version="1"} 100
# TYPE nv_inference_queue_duration_us counter
nv_inference_queue_duration_us{model="risk",version="2"} 50000
nv_inference_queue_duration_us{model="digits",version="1"} 50000
# TYPE nv_inference_compute_infer_duration_us counter
nv_inference_compute_infer_duration_us{model="risk",version="2"} 150000
nv_inference_compute_infer_duration_us{model="digits",version="1"} 150000
"""


def _request() -> InferRequest:
    return InferRequest("toy", "2", (Tensor("features", "FP32", np.zeros((1, 3), np.float32)),))


async def _poll(check: Callable[[], bool], timeout_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def test_scrape_sums_models_and_the_score_follows_queue_and_service_time() -> None:
    c = parse_server_counters(SCRAPE)
    assert c == ServerCounters(pending=4, queue_us=100_000, compute_us=300_000, requests=200)
    load = ServerLoad()
    load.update(ServerCounters(requests=0))
    assert load.mean_service_s is None  # one scrape: no interval yet
    load.update(c)
    assert load.mean_service_s == 400_000 / 200 / 1e6  # 2 ms per request
    # 4 pending in Triton (from any gateway) outweigh our own 1 in flight.
    assert load_score(load, in_flight=1) == (4 + 1) * 0.002
    load.update(ServerCounters(requests=10))  # restarted: counters fell, no negative mean
    assert load.mean_service_s == 0.002
    load.fail()
    assert load_score(load, 0) > load_score(ServerLoad(mean_service_s=0.05), 5)


async def test_power_of_two_choices_never_picks_the_most_loaded_of_three() -> None:
    backends = {n: toy_backend() for n in "abc"}
    pool = BackendPool(
        [PoolMember(n, b) for n, b in backends.items()], rng=random.Random(3), clock=FakeClock()
    )
    for member, service_s in zip(pool.members, (0.001, 0.004, 0.1), strict=True):
        member.load.mean_service_s = service_s
    for _ in range(300):
        await pool.infer(_request(), Deadline.after(1.0))
    calls = {n: len(b.calls) for n, b in backends.items()}
    assert calls["c"] == 0, calls  # always compared with a faster one
    assert calls["a"] > calls["b"] > 0, calls  # b wins only when a is not drawn (1/3)


async def test_least_in_flight_mode_ignores_triton_load() -> None:
    a, b = toy_backend(), toy_backend()
    pool = BackendPool([PoolMember("a", a), PoolMember("b", b)], routing="least_in_flight")
    pool.members[0].load.mean_service_s = 10.0  # a looks very slow to Triton's counters
    pool.members[1].load.mean_service_s = 0.001
    await pool.infer(_request(), Deadline.after(1.0))
    assert (len(a.calls), len(b.calls)) == (1, 0)  # tie on in-flight: the first listed
    load_aware = BackendPool([PoolMember("a", a), PoolMember("b", b)])
    load_aware.members[0].load.mean_service_s = 10.0
    load_aware.members[1].load.mean_service_s = 0.001
    await load_aware.infer(_request(), Deadline.after(1.0))
    assert (len(a.calls), len(b.calls)) == (1, 1)


async def test_a_retry_prefers_an_untried_server_over_a_less_loaded_one() -> None:
    a, b, c = toy_backend(), toy_backend(), toy_backend()
    a.fail_with = BackendUnavailable("refused")
    pool = BackendPool([PoolMember(n, x) for n, x in zip("abc", (a, b, c), strict=True)])
    pool.rng = random.Random(0)
    for member, service_s in zip(pool.members, (0.001, 0.5, 0.2), strict=True):
        member.load.mean_service_s = service_s
    for _ in range(20):
        resp = await pool.infer(_request(), Deadline.after(1.0))
        assert resp.model == "toy"
    # every call a took was retried elsewhere, never on a again
    assert len(b.calls) + len(c.calls) == 20
    assert len(a.calls) <= 20


async def test_scrape_load_reads_every_member_and_ranks_an_unreadable_one_last() -> None:
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text=SCRAPE, content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    a, b = toy_backend(), toy_backend()
    pool = BackendPool(
        [
            PoolMember("a", a, metrics_url=f"http://127.0.0.1:{port}/metrics"),
            PoolMember("b", b, metrics_url=f"http://127.0.0.1:{port}/missing"),
        ]
    )
    try:
        async with ClientSession() as session:
            await pool.scrape_load(session, timeout_s=1.0)
            await pool.scrape_load(session, timeout_s=1.0)
    finally:
        await runner.cleanup()
    ma, mb = pool.members
    assert ma.load.pending == 4 and not ma.load.failing
    assert mb.load.failing  # a 404 is no load reading
    await pool.infer(_request(), Deadline.after(1.0))
    assert (len(a.calls), len(b.calls)) == (1, 0)


class ClosingBackend(FakeBackend):
    def __init__(self) -> None:
        super().__init__(list(toy_backend().models.values()))
        self.closed = False

    async def close(self) -> None:
        self.closed = True


async def test_a_removed_member_drains_then_closes() -> None:
    a, b = ClosingBackend(), toy_backend()
    a.latency_s = 0.05
    pool = BackendPool([PoolMember("a", a), PoolMember("b", b)])
    slow = asyncio.create_task(pool.infer(_request(), Deadline.after(1.0)))  # lands on a
    await _poll(lambda: a.in_flight == 1)
    pool.remove_member("a")
    for _ in range(5):  # a takes no new calls while it drains
        await pool.infer(_request(), Deadline.after(1.0))
    assert len(a.calls) == 1 and len(b.calls) == 5
    assert not a.closed and [m.name for m in pool.members] == ["a", "b"]
    assert (await slow).model == "toy"  # the call in flight finished
    await _poll(lambda: a.closed)
    assert [m.name for m in pool.members] == ["b"]


async def test_dns_discovery_adds_drains_and_survives_a_failed_lookup() -> None:
    answers: list[list[str] | OSError] = [
        ["10.0.0.1", "10.0.0.2"],
        ["10.0.0.2", "10.0.0.3"],
        OSError("temporary failure in name resolution"),
    ]
    asked: list[tuple[str, int]] = []

    async def resolver(host: str, port: int) -> list[str]:
        asked.append((host, port))
        answer = answers.pop(0)
        if isinstance(answer, OSError):
            raise answer
        return answer

    made: dict[str, str] = {}

    def make(name: str, url: str) -> FakeBackend:
        made[name] = url
        return toy_backend()

    pool = BackendPool([], allow_empty=True)
    source = DnsSource.parse("triton", "triton-headless.ml.svc:8001", metrics_port=8002)
    discovery = DnsDiscovery(pool, [source], make, resolver=resolver)
    await discovery.refresh()
    assert [m.name for m in pool.members] == ["triton/10.0.0.1", "triton/10.0.0.2"]
    assert made["triton/10.0.0.1"] == "10.0.0.1:8001"
    assert pool.members[0].metrics_url == "http://10.0.0.1:8002/metrics"
    await discovery.refresh()  # .1 gone (idle: closed at once), .3 new
    assert [m.name for m in pool.members] == ["triton/10.0.0.2", "triton/10.0.0.3"]
    await discovery.refresh()  # lookup failed: keep what there is
    assert [m.name for m in pool.members] == ["triton/10.0.0.2", "triton/10.0.0.3"]
    assert asked == [("triton-headless.ml.svc", 8001)] * 3
    assert (await pool.infer(_request(), Deadline.after(1.0))).model == "toy"


class Blocking(service_pb2_grpc.GRPCInferenceServiceServicer):
    """ModelInfer waits for `release`; records the peer (one TCP connection per channel)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.peers: list[str] = []

    async def ModelInfer(self, request, context):  # type: ignore[no-untyped-def]
        self.peers.append(context.peer())
        await self.release.wait()
        return service_pb2.ModelInferResponse(model_name=request.model_name, model_version="2")


async def _grpc_server(servicer: Blocking) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def test_channel_rotates_after_max_age_and_the_old_one_closes_after_its_calls() -> None:
    servicer = Blocking()
    server, port = await _grpc_server(servicer)
    clock = FakeClock()
    backend = TritonBackend(f"127.0.0.1:{port}", max_channel_age_s=60.0, clock=clock)
    try:

        def call() -> Awaitable[object]:
            return asyncio.create_task(backend.infer(_request(), Deadline.after(5.0)))

        first = call()
        await _poll(lambda: len(servicer.peers) == 1)
        old = backend._current
        clock.advance(61.0)
        second = call()
        await _poll(lambda: len(servicer.peers) == 2)
        assert backend.rotations == 1 and backend._current is not old
        assert old.retired and old.calls == 1 and not backend._closing  # still carrying one
        assert servicer.peers[0] != servicer.peers[1]  # a new connection
        servicer.release.set()
        assert (await first).model == "toy" and (await second).model == "toy"  # type: ignore[attr-defined]
        await _poll(lambda: old.channel.get_state() == grpc.ChannelConnectivity.SHUTDOWN)
        assert backend._current.channel.get_state() != grpc.ChannelConnectivity.SHUTDOWN
    finally:
        await backend.close()
        await server.stop(None)


async def test_settings_wire_dns_servers_scrapes_and_channel_age() -> None:
    from gateway.app import build_pool, pool_jobs
    from gateway.config import load_settings
    from gateway.metrics import Metrics

    root = ROOT
    env = {
        "SWITCHYARD__TRITON__SERVERS": (
            "[{name: fixed, grpc_url: '127.0.0.1:1', metrics_url: 'http://127.0.0.1:2/metrics'},"
            " {name: triton, dns: 'triton-headless:8001', metrics_port: 9002}]"
        ),
        "SWITCHYARD__TRITON__MAX_CHANNEL_AGE_S": "30",
        "SWITCHYARD__TRITON__SERVERS_FILE": "/etc/switchyard/servers.yaml",
    }
    settings = load_settings(root / "configs" / "gateway.yaml", env=env, base_dir=root)
    assert settings.triton.routing == "load_aware"
    pool = build_pool(settings, Metrics())
    (fixed,) = pool.members  # the dns: entry joins once resolved
    assert fixed.metrics_url == "http://127.0.0.1:2/metrics"
    assert isinstance(fixed.backend, TritonBackend) and fixed.backend.max_channel_age_s == 30
    jobs = pool_jobs(settings, pool)
    names = sorted(j.__qualname__ for j in jobs)
    for job in jobs:
        job.close()  # built, not run
    assert names == ["BackendPool.run_load_scrapes", "DnsDiscovery.run", "ServersFile.run"]
    await pool.close()


def test_peak_ewma_jumps_on_a_slow_answer_and_decays() -> None:
    load = ServerLoad(decay_s=1.0)
    load.observe(0.002, now=0.0)
    load.observe(0.2, now=0.1)  # a stall shows at once
    assert load.ewma_s == 0.2
    load.observe(0.002, now=3.1)  # three time constants of fast answers later
    assert load.ewma_s is not None and load.ewma_s < 0.02
    load.mean_service_s = 0.05  # Triton's counters, when larger, win
    assert load.service_s() == 0.05


async def test_without_metrics_observed_latency_steers_calls_off_a_slow_server() -> None:
    slow, fast = toy_backend(), toy_backend()
    slow.latency_s = 0.02
    pool = BackendPool([PoolMember("slow", slow), PoolMember("fast", fast)])
    for _ in range(20):
        await pool.infer(_request(), Deadline.after(1.0))
    # the first call measured "slow"; "fast", unmeasured, is tried next and stays preferred
    assert len(slow.calls) == 1 and len(fast.calls) == 19


async def test_servers_file_adds_and_drains_members_and_ignores_a_bad_edit(
    tmp_path: Path,
) -> None:
    from gateway.backends.discovery import ServersFile

    path = tmp_path / "servers.yaml"
    path.write_text(
        "- {name: t1, grpc_url: '10.0.0.1:8001', models: [toy], metrics_url: 'http://x/metrics'}\n"
        "- {name: t2, grpc_url: '10.0.0.2:8001'}\n"
    )
    made: dict[str, str] = {}

    def make(name: str, url: str) -> FakeBackend:
        made[name] = url
        return toy_backend()

    fixed = PoolMember("fixed", toy_backend())
    pool = BackendPool([fixed])
    servers = ServersFile(pool, path, make)
    servers.refresh()
    assert [m.name for m in pool.members] == ["fixed", "t1", "t2"]
    assert made == {"t1": "10.0.0.1:8001", "t2": "10.0.0.2:8001"}
    assert pool.members[1].models == frozenset({"toy"})
    assert pool.members[1].metrics_url == "http://x/metrics"
    path.write_text("- {name: t2, grpc_url: '10.0.0.2:8001'}\n")  # t1 removed: it drains
    servers.refresh()
    assert [m.name for m in pool.members] == ["fixed", "t2"]  # configured members stay
    path.write_text("- {name: t3}\n")  # invalid: nothing changes
    servers.refresh()
    assert [m.name for m in pool.members] == ["fixed", "t2"]
