"""`serve --workers 2`: both workers answer on one port, /metrics sums them, SIGTERM drains
in-flight requests and exits 0, SIGHUP replaces the workers one by one."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import tritonclient.grpc as grpcclient

from gateway.tritonserver import TritonServer
from tests.integration.conftest import GatewayProcess, start_gateway, stop_gateway, wait_http_ok

ROW = [0.1] * 30


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as r:  # a new connection per call
        return r.read()


def _predict(url: str) -> int:
    body = json.dumps({"model_name": "risk", "features": ROW}).encode()
    req = urllib.request.Request(f"{url}/v1/predict", data=body, method="POST")
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status


def _pids_answering(url: str, want: int, timeout_s: float = 30) -> set[int]:
    """Poll /healthz over fresh connections until ``want`` distinct worker pids answered."""
    seen: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while len(seen) < want and time.monotonic() < deadline:
        seen.add(json.loads(_get(f"{url}/healthz"))["pid"])
    return seen


def _requests_total(url: str, model: str) -> float:
    text = _get(f"{url}/metrics").decode()
    pattern = rf'^inference_requests_total\{{[^}}]*model="{model}"[^}}]*status="ok"[^}}]*\}} (\S+)$'
    return sum(float(v) for v in re.findall(pattern, text, re.MULTILINE))


@pytest.fixture
def workers2(triton: TritonServer, repo_root: Path, tmp_path: Path) -> Iterator[GatewayProcess]:
    gw = start_gateway(repo_root, tmp_path, triton.grpc_url, args=("--workers", "2"))
    try:
        wait_http_ok(f"{gw.url}/readyz", 60, gw.process, gw.log_file)
        yield gw
    finally:
        if gw.process.poll() is None:
            stop_gateway(gw)


def test_two_workers_share_the_ports_and_metrics(workers2: GatewayProcess) -> None:
    children = {p.pid for p in psutil.Process(workers2.process.pid).children()}
    assert len(children) >= 2, children  # spawn may add a resource tracker
    answered = _pids_answering(workers2.url, 2)
    assert len(answered) == 2 and answered <= children, (answered, children)
    # The gRPC port too: each worker bound it (SO_REUSEPORT), as it did the REST one.
    grpc_port = int(workers2.grpc_url.rsplit(":", 1)[1])
    listening = {
        pid
        for pid in answered
        for c in psutil.Process(pid).net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == grpc_port
    }
    assert listening == answered
    client = grpcclient.InferenceServerClient(workers2.grpc_url)
    try:
        assert client.is_server_ready()
    finally:
        client.close()

    n = 40
    assert all(_predict(workers2.url) == 200 for _ in range(n))
    # Every scrape, whichever worker answers it, sums every worker's counts.
    for _ in range(4):
        assert _requests_total(workers2.url, "risk") == n
    # And the counts do come from both workers: each wrote its own multiprocess value file.
    env = psutil.Process(next(iter(answered))).environ()
    files = {p.name for p in Path(env["PROMETHEUS_MULTIPROC_DIR"]).glob("counter_*.db")}
    assert {f"counter_{pid}.db" for pid in answered} <= files


def test_sigterm_drains_in_flight_requests_and_exits_0(
    workers2: GatewayProcess, triton: TritonServer
) -> None:
    body = json.dumps(
        {"model_name": "risk", "features": ROW, "context": {"deadline_ms": 20000}}
    ).encode()
    assert triton.pid is not None
    with socket.create_connection(("127.0.0.1", workers2.port), timeout=20) as sock:
        head = (
            f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n"
        ).encode()
        sock.sendall(head)
        # "100 Continue": a worker accepted the connection and runs the handler.
        assert sock.recv(1024).startswith(b"HTTP/1.1 100")
        # Freeze Triton so the request stays in flight at the backend call while we stop.
        os.kill(triton.pid, signal.SIGSTOP)
        try:
            sock.sendall(body)
            workers2.process.send_signal(signal.SIGTERM)
            _wait_listener_closed(workers2.port)  # the workers are shutting down
        finally:
            os.kill(triton.pid, signal.SIGCONT)
        reply = _read_response(sock)
    assert reply.startswith(b"HTTP/1.1 200"), reply[:300]
    assert b'"model_version":"2"' in reply
    assert workers2.process.wait(30) == 0


def _wait_listener_closed(port: int, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return
    raise AssertionError(f"port {port} still accepts connections {timeout_s}s after SIGTERM")


def _read_response(sock: socket.socket) -> bytes:
    reply = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            raise AssertionError(f"no complete response; got {reply[:300]!r}") from None
        if not chunk:
            return reply
        reply += chunk
        head, sep, rest = reply.partition(b"\r\n\r\n")
        length = re.search(rb"(?i)content-length: (\d+)", head)
        if sep and length and len(rest) >= int(length.group(1)):
            return reply


def test_sighup_replaces_workers_one_by_one(workers2: GatewayProcess) -> None:
    """No request fails while the workers are replaced, with new connections arriving all
    the time: a worker that stops must not take the connections queued for it down with it
    (with a listening socket per worker, SO_REUSEPORT, the kernel reset them)."""
    old = _pids_answering(workers2.url, 2)
    stop, errors = threading.Event(), []

    def hammer() -> int:  # a fresh connection per request, as fast as they are answered
        sent = 0
        while not stop.is_set():
            try:
                assert _predict(workers2.url) == 200
            except OSError as exc:
                errors.append(repr(exc))
            sent += 1
        return sent

    with ThreadPoolExecutor(16) as pool:
        load = [pool.submit(hammer) for _ in range(16)]
        workers2.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 90
        failures, new = 0, set()
        try:
            while time.monotonic() < deadline:
                try:
                    pid = json.loads(_get(f"{workers2.url}/healthz"))["pid"]
                except OSError:
                    failures += 1
                    continue
                if pid not in old:
                    new.add(pid)
                live = {p.pid for p in psutil.Process(workers2.process.pid).children()}
                if len(new) == 2 and not (old & live):
                    break
        finally:
            stop.set()
        sent = sum(f.result() for f in load)
    assert len(new) == 2, (old, new)
    assert sent > 100  # the reload happened under load
    assert failures == 0 and errors == [], (failures, errors[:5], sent)
