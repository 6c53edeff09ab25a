"""The `make run` stack on free ports, for the scripts in docs/ that show the project working.

`start(work, env, name)` runs `python -m gateway up` (both tritonservers and the gateway, as
`make run` does) with every port free, on a copy of configs/routes (and of model_repository
when asked) in `work`, with Redis keys of its own (prediction log, labels, rollout lease and
audit; `drop_keys` deletes them), and the gateway's log in `work/up.log`. The scripts import
it as `stack`: they run as `python docs/<script>.py`, which puts docs/ on sys.path.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TRITON_FLAGS = ("triton-http", "triton-grpc", "triton-metrics",
                "fallback-http", "fallback-grpc", "fallback-metrics")  # fmt: skip


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_until(check: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Poll `check` until it returns something true (returned); TimeoutError past the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.2)


def get_json(url: str) -> Any:
    """The JSON document at `url`, or None (unreachable, an error status, not JSON)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.loads(r.read())
    except (OSError, ValueError):
        return None


@dataclass
class Stack:
    proc: subprocess.Popen[bytes]
    url: str  # the gateway's REST base URL
    triton_grpc: str  # the primary tritonserver's gRPC host:port
    prefix: str  # of the prediction-log stream (and any other Redis keys the caller sets)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(2)  # SIGINT: the gateway stops, then both tritonservers
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def start(work: Path, env: dict[str, str], name: str, copy_models: bool = False) -> Stack:
    """Start the stack; `env` is updated with the settings it runs with (pass it on to every
    command that should talk to this stack)."""
    shutil.copytree(ROOT / "configs/routes", work / "routes")
    if copy_models:
        shutil.copytree(ROOT / "model_repository", work / "model_repository",
                        ignore=shutil.ignore_patterns("__pycache__", ".publish"))  # fmt: skip
        env["SWITCHYARD__ROUTING__MODEL_REPOSITORY"] = str(work / "model_repository")
    port, grpc, *triton = free_ports(2 + len(TRITON_FLAGS))
    prefix = f"{name}-{uuid.uuid4().hex[:8]}"
    env.update({
        "SWITCHYARD__ROUTING__ROUTES_DIR": str(work / "routes"),
        "SWITCHYARD__ROUTING__RELOAD_INTERVAL_S": "0.2",
        "SWITCHYARD__ROLLOUT__RECORD_DIR": str(work / "rollout"),
        "SWITCHYARD__PREDLOG__SPOOL_DIR": str(work / "spool"),
        "SWITCHYARD__PREDLOG__STREAM_PREFIX": prefix,
        "SWITCHYARD__ROLLOUT__KEY_PREFIX": prefix,
        "SWITCHYARD__FEEDBACK__LABEL_PREFIX": f"{prefix}-label",
        "SWITCHYARD__FEEDBACK__ANSWERED_PREFIX": f"{prefix}-answered",
        "SWITCHYARD__SERVER__HOST": "127.0.0.1",
        "SWITCHYARD__SERVER__PORT": str(port),
        "SWITCHYARD__SERVER__GRPC_PORT": str(grpc),
    })  # fmt: skip
    ports = [f"--{flag}-port={p}" for flag, p in zip(TRITON_FLAGS, triton, strict=True)]
    log = (work / "up.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "up", "--port", str(port),
         "--triton-log-file", str(work / "triton.log"), *ports],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    log.close()  # the child has its own descriptor
    stack = Stack(proc, f"http://127.0.0.1:{port}", f"127.0.0.1:{triton[1]}", prefix)
    try:
        wait_until(lambda: get_json(f"{stack.url}/readyz") is not None, 240, "the stack (readyz)")
    except TimeoutError:
        stack.stop()
        print((work / "up.log").read_text()[-3000:], file=sys.stderr)
        raise
    return stack


def drop_keys(env: dict[str, str], prefix: str) -> None:
    """Delete every Redis key a stack started with this prefix wrote."""
    import redis  # the project's dependency; imported here to keep --help instant

    client = redis.Redis.from_url(env.get("SWITCHYARD__REDIS__URL", "redis://127.0.0.1:6379/0"))
    try:
        for pattern in (f"{prefix}:*", f"{prefix}-label:*", f"{prefix}-answered:*"):
            for key in client.scan_iter(pattern):
                client.delete(key)
    finally:
        client.close()
