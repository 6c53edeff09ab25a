"""`serve --workers N`: N gateway processes on one port, supervised by a parent.

Each worker is a full gateway (its own event loop, gRPC channel, breakers); they share
nothing but Redis and the REST listening socket, which the parent binds once and hands to
each (`serving.rest_listener`: one accept queue, so a worker that stops never strands the
connections queued for it). The gRPC port is bound by each worker with SO_REUSEPORT.
The parent only supervises:

- SIGTERM / SIGINT: forwarded to every worker as SIGTERM; each drains its in-flight requests
  (aiohttp's graceful shutdown) and exits; the parent exits 0 when they all did.
- SIGHUP: graceful reload, one worker at a time: start a replacement, wait until it listens,
  then stop the old one, so the port never goes unserved.
- A worker that dies on its own is restarted (after a short pause, so a crash loop stays cheap).

Metrics: the parent sets PROMETHEUS_MULTIPROC_DIR to a fresh directory before any worker
starts (prometheus_client reads it at import), and each worker's /metrics aggregates every
worker's values from it (`Metrics(multiprocess_dir=...)`).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import multiprocessing.connection
import multiprocessing.synchronize
import os
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from types import FrameType

import structlog

from gateway.config import Settings
from gateway.metrics import MULTIPROC_ENV

log = structlog.get_logger(__name__)

_PR_SET_PDEATHSIG = 1
_READY_TIMEOUT_S = 60.0
_RESTART_PAUSE_S = 1.0


def run_worker(
    settings: Settings, ready: multiprocessing.synchronize.Event, sock: socket.socket
) -> None:
    """Entry point of one worker process (spawned, so it imports everything afresh); `sock`
    is the supervisor's REST listening socket, shared by every worker."""
    from gateway.serving import serve_one

    # Own session: a terminal's Ctrl-C reaches only the parent, which forwards one SIGTERM
    # (a second signal would cut the worker's drain short). Die with the parent, too.
    os.setsid()
    _die_with_parent()
    serve_one(settings, reuse_port=True, on_listening=ready.set, sock=sock)


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


@dataclass
class _Worker:
    process: BaseProcess
    ready: multiprocessing.synchronize.Event
    started: float = field(default_factory=time.monotonic)


class Supervisor:
    """Starts, restarts, reloads and stops the worker processes."""

    def __init__(self, settings: Settings, workers: int) -> None:
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.settings = settings
        self.count = workers
        self._ctx = multiprocessing.get_context("spawn")
        self._workers: list[_Worker] = []
        self._stop = False
        self._reload = False
        self._metrics_dir = ""
        self._sock: socket.socket | None = None

    def run(self) -> int:
        """Block until SIGTERM/SIGINT; return 0 when every worker exited cleanly."""
        from gateway.serving import rest_listener

        self._sock = rest_listener(self.settings.server)  # before any worker: one queue
        self._metrics_dir = tempfile.mkdtemp(prefix="switchyard-metrics-")
        os.environ[MULTIPROC_ENV] = self._metrics_dir  # inherited by the spawned workers
        previous = {
            sig: signal.signal(sig, self._on_signal)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        }
        try:
            for _ in range(self.count):
                self._workers.append(self._spawn())
            log.info("workers_started", pids=[w.process.pid for w in self._workers])
            while not self._stop:
                if self._reload:
                    self._reload = False
                    self._rolling_restart()
                self._reap_and_restart()
            return self._shutdown()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            os.environ.pop(MULTIPROC_ENV, None)
            shutil.rmtree(self._metrics_dir, ignore_errors=True)
            self._sock.close()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self._reload = True
        else:
            self._stop = True

    def _spawn(self) -> _Worker:
        assert self._sock is not None, "run() binds the listening socket first"
        ready = self._ctx.Event()
        proc = self._ctx.Process(
            target=run_worker, args=(self.settings, ready, self._sock), name="switchyard-worker"
        )
        proc.start()
        return _Worker(proc, ready)

    def _reap_and_restart(self) -> None:
        sentinels = [w.process.sentinel for w in self._workers]
        multiprocessing.connection.wait(sentinels, timeout=0.2)  # wakes on a worker's exit
        for i, w in enumerate(self._workers):
            if w.process.is_alive() or self._stop:
                continue
            log.error("worker_died", pid=w.process.pid, exitcode=w.process.exitcode)
            self._mark_dead(w)
            if time.monotonic() - w.started < _RESTART_PAUSE_S:
                time.sleep(_RESTART_PAUSE_S)  # a worker that dies at start-up: don't spin
            self._workers[i] = self._spawn()

    def _rolling_restart(self) -> None:
        log.info("reload_started", workers=len(self._workers))
        for i, old in enumerate(list(self._workers)):
            new = self._spawn()
            if not new.ready.wait(_READY_TIMEOUT_S):
                log.error("reload_aborted", reason="replacement worker not listening")
                self._terminate([new])
                return
            self._terminate([old])
            self._workers[i] = new
        log.info("reload_done", pids=[w.process.pid for w in self._workers])

    def _terminate(self, workers: list[_Worker]) -> list[int | None]:
        for w in workers:
            if w.process.is_alive() and w.process.pid is not None:
                os.kill(w.process.pid, signal.SIGTERM)
        grace = self.settings.server.shutdown_timeout_s + self.settings.server.drain_grace_s + 5.0
        codes = []
        for w in workers:
            w.process.join(grace)
            if w.process.is_alive():
                log.error("worker_killed", pid=w.process.pid, after_s=grace)
                w.process.kill()
                w.process.join(5)
            self._mark_dead(w)
            codes.append(w.process.exitcode)
        return codes

    def _mark_dead(self, w: _Worker) -> None:
        from prometheus_client import multiprocess

        if w.process.pid is not None:
            multiprocess.mark_process_dead(w.process.pid, self._metrics_dir)

    def _shutdown(self) -> int:
        started = [w.ready.is_set() for w in self._workers]
        codes = self._terminate(self._workers)
        log.info("workers_stopped", exitcodes=codes)
        # A worker still starting up has no signal handler yet and dies of our SIGTERM: it
        # never served a request, so that is a clean stop too. Serving workers must drain
        # and exit 0.
        clean = all(
            c == 0 or (c == -signal.SIGTERM and not was_ready)
            for c, was_ready in zip(codes, started, strict=True)
        )
        return 0 if clean else 1
