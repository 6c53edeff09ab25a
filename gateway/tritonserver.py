"""Locate and launch the ``tritonserver`` binary that the ``nvidia-pytriton`` wheel ships.

Why this exists: local runs (``make run``) and integration tests need a *real* Triton
Inference Server without Docker. The PyPI wheel ``nvidia-pytriton==0.7.0`` carries a full
``tritonserver`` build plus the Python backend, but using it by hand takes a recipe:

* the Python backend stub for the running interpreter must be copied next to the backend
  library in a writable backend directory;
* the wheel's bundled shared libraries must be on ``LD_LIBRARY_PATH``;
* the stub starts the first ``python3`` on ``PATH`` (``PYTHONPATH`` is not honoured), so this
  interpreter's directory must come first, or models cannot import numpy & co.

Exceptions::

    TritonLaunchError
     ├── TritonNotFound      the wheel, binary, backend or stub for this Python is missing
     └── TritonStartError    the server exited early or did not become ready in time

Nothing happens at import time; every path is found by ``TritonInstallation.locate()``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Literal, Self

ModelControlMode = Literal["none", "poll", "explicit"]

_INSTALL_HINT = "pip install nvidia-pytriton==0.7.0"
_LOCALHOST = "127.0.0.1"


class TritonLaunchError(RuntimeError):
    """Base class for every failure to find or start tritonserver."""


class TritonNotFound(TritonLaunchError):
    """The wheel's tritonserver, or a piece it needs for this Python, is missing."""


class TritonStartError(TritonLaunchError):
    """tritonserver exited early or did not report ready before the deadline."""


@dataclass(frozen=True)
class TritonInstallation:
    """Paths inside an installed ``nvidia-pytriton`` wheel, for one Python interpreter."""

    binary: Path
    python_backend: Path
    stub: Path
    libs_dir: Path
    python: Path

    @classmethod
    def locate(cls, python: str | Path | None = None) -> TritonInstallation:
        """Find the wheel's server for ``python`` (default: this interpreter).

        ``python`` must be the interpreter that runs this code's environment: its minor
        version picks the stub, and its directory goes first on the server's ``PATH``.
        """
        spec = importlib.util.find_spec("pytriton")  # finds without importing (heavy)
        if spec is None or not spec.submodule_search_locations:
            raise TritonNotFound(f"the nvidia-pytriton wheel is not installed: {_INSTALL_HINT}")
        package = Path(next(iter(spec.submodule_search_locations)))
        site_packages = package.parent
        home = package / "tritonserver"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stubs = home / "python_backend_stubs"
        found = cls(
            binary=home / "bin" / "tritonserver",
            python_backend=home / "backends" / "python",
            stub=stubs / version / "triton_python_backend_stub",
            libs_dir=site_packages / "nvidia_pytriton.libs",
            python=Path(python if python is not None else sys.executable),
        )
        for what, path in (
            ("tritonserver binary", found.binary),
            ("Python backend", found.python_backend),
            ("bundled libraries", found.libs_dir),
        ):
            if not path.exists():
                raise TritonNotFound(f"{what} missing at {path}; reinstall: {_INSTALL_HINT}")
        if not found.stub.is_file():
            available = sorted(p.name for p in stubs.iterdir()) if stubs.is_dir() else []
            raise TritonNotFound(
                f"no Python backend stub for Python {version} in {stubs}, "
                f"available: {', '.join(available) or 'none'}; use one of those Pythons"
            )
        return found

    def make_backend_dir(self, dest: Path) -> Path:
        """Build a ``--backend-directory`` under ``dest`` with the stub for this Python."""
        python_dir = dest / "python"
        shutil.copytree(
            self.python_backend, python_dir, ignore=shutil.ignore_patterns("__pycache__")
        )
        shutil.copy2(self.stub, python_dir / self.stub.name)
        return dest

    def environment(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for the server: bundled libs and this Python's bin dir first."""
        env = dict(os.environ if base is None else base)
        env["LD_LIBRARY_PATH"] = _prepend(str(self.libs_dir), env.get("LD_LIBRARY_PATH"))
        env["PATH"] = _prepend(str(self.python.parent), env.get("PATH"))
        return env


def _prepend(item: str, path_list: str | None) -> str:
    return f"{item}{os.pathsep}{path_list}" if path_list else item


def free_port(host: str = _LOCALHOST) -> int:
    """A TCP port that was free a moment ago (the OS may hand it out again; good enough)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class TritonPorts:
    """The three ports a tritonserver listens on."""

    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002

    @classmethod
    def free(cls, host: str = _LOCALHOST) -> TritonPorts:
        """Three distinct free ports (held open together so they cannot collide)."""
        with contextlib.ExitStack() as stack:
            socks = [stack.enter_context(socket.socket()) for _ in range(3)]
            for sock in socks:
                sock.bind((host, 0))
            http, grpc, metrics = (int(sock.getsockname()[1]) for sock in socks)
        return cls(http=http, grpc=grpc, metrics=metrics)


@dataclass(frozen=True)
class TritonOptions:
    """What to serve and how: everything that becomes a tritonserver command-line flag."""

    model_repository: Path
    ports: TritonPorts = field(default_factory=TritonPorts)
    address: str = _LOCALHOST
    model_control_mode: ModelControlMode | None = None
    load_models: tuple[str, ...] = ()
    log_verbose: int = 0
    exit_on_error: bool = True
    #: OpenTelemetry tracing to this OTLP/HTTP traces URL (".../v1/traces"); "": off.
    trace_url: str = ""
    trace_export_delay_ms: int = 1000
    extra_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Triton rejects these combinations too, but only after a slow start and in its log.
        if self.load_models and self.model_control_mode != "explicit":
            raise ValueError("load_models needs model_control_mode='explicit'")
        if "*" in self.load_models and len(self.load_models) > 1:
            raise ValueError("'*' must be the only entry of load_models")

    def args(self, backend_dir: Path) -> list[str]:
        """Command-line flags, given the backend directory built for this launch."""
        p = self.ports
        args = [
            f"--model-repository={Path(self.model_repository).resolve()}",
            f"--backend-directory={backend_dir}",
            f"--http-address={self.address}",
            f"--http-port={p.http}",
            f"--grpc-address={self.address}",
            f"--grpc-port={p.grpc}",
            f"--metrics-address={self.address}",
            f"--metrics-port={p.metrics}",
            f"--exit-on-error={str(self.exit_on_error).lower()}",
        ]
        if self.log_verbose:
            args.append(f"--log-verbose={self.log_verbose}")
        if self.model_control_mode:
            args.append(f"--model-control-mode={self.model_control_mode}")
        args.extend(f"--load-model={name}" for name in self.load_models)
        args.extend(self.trace_args())
        args.extend(self.extra_args)
        return args

    def trace_args(self) -> list[str]:
        """Triton's OpenTelemetry mode (docs/user_guide/trace.md): spans to ``trace_url``.
        ``rate=0``: only requests that carry a propagated context (the gateway's sampled
        traceparent) are traced, as children of the gateway's call; its own sampling
        would start traces nobody asked for."""
        if not self.trace_url:
            return []
        settings = (
            "mode=opentelemetry",
            "rate=0",
            "count=-1",
            "level=TIMESTAMPS",
            f"opentelemetry,url={self.trace_url}",
            "opentelemetry,resource=service.name=triton",
            f"opentelemetry,bsp_schedule_delay={self.trace_export_delay_ms}",
        )
        return [arg for setting in settings for arg in ("--trace-config", setting)]


class TritonServer:
    """One tritonserver child process: ``start``, ``wait_ready``, ``stop``; or ``with``.

    The child gets its own process group, so ``stop`` also reaches the Python backend stubs
    it forks. Its stdout and stderr go to ``log_file`` (default: a file in the launch's temp
    directory, removed on ``stop``), whose tail is put into every start error.
    """

    def __init__(
        self,
        options: TritonOptions,
        *,
        installation: TritonInstallation | None = None,
        log_file: str | Path | None = None,
        ready_timeout_s: float = 120.0,
    ) -> None:
        self.options = options
        self.installation = installation
        self.ready_timeout_s = ready_timeout_s
        self._log_file = Path(log_file) if log_file is not None else None
        self._workdir: Path | None = None
        self._log: IO[bytes] | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._stopped = False

    # -- addresses -------------------------------------------------------------------------
    @property
    def ports(self) -> TritonPorts:
        return self.options.ports

    @property
    def http_url(self) -> str:
        return f"http://{self._client_host}:{self.ports.http}"

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host}:{self.ports.grpc}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host}:{self.ports.metrics}/metrics"

    @property
    def _client_host(self) -> str:
        return _LOCALHOST if self.options.address in ("0.0.0.0", "") else self.options.address

    # -- state -----------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def log_path(self) -> Path | None:
        """Where the server's output goes (``None`` before ``start``)."""
        return Path(self._log.name) if self._log else self._log_file

    def log_tail(self, lines: int = 40) -> str:
        path = self.log_path
        if path is None or not path.exists():
            return ""
        text = path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> Self:
        """Launch the child; returns at once (see ``wait_ready``)."""
        if self._process is not None:
            raise TritonLaunchError("this TritonServer was already started")
        installation = self.installation or TritonInstallation.locate()
        self._workdir = Path(tempfile.mkdtemp(prefix="switchyard-triton-"))
        try:
            backend_dir = installation.make_backend_dir(self._workdir / "backends")
            log_path = self._log_file or self._workdir / "tritonserver.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = log_path.open("wb")
            self._process = subprocess.Popen(
                [str(installation.binary), *self.options.args(backend_dir)],
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=installation.environment(),
                start_new_session=True,  # own process group: stop() reaches the stubs too
            )
        except BaseException:
            self._cleanup()
            raise
        return self

    def wait_ready(self, timeout_s: float | None = None, poll_s: float = 0.1) -> None:
        """Poll ``/v2/health/ready`` until it answers 200; raise with the log tail if not."""
        if self._process is None:
            raise TritonLaunchError("start() the server before wait_ready()")
        timeout = self.ready_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        url = f"{self.http_url}/v2/health/ready"
        while True:
            code = self._process.poll()
            if code is not None:
                raise TritonStartError(
                    f"tritonserver exited with code {code} before it was ready; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            if _is_ready(url):
                return
            if time.monotonic() >= deadline:
                raise TritonStartError(
                    f"tritonserver not ready at {url} after {timeout:.0f} s; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(poll_s)

    def wait(self, timeout_s: float | None = None) -> int:
        """Block until the child exits on its own; its return code."""
        if self._process is None:
            raise TritonLaunchError("the server was never started")
        return self._process.wait(timeout_s)

    def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM the process group, SIGKILL it after ``grace_s``; idempotent.

        Returns the server's exit code (``None`` if it was never started).
        """
        process = self._process
        if process is None or self._stopped:
            self._cleanup()
            return process.returncode if process else None
        self._stopped = True
        try:
            if process.poll() is None:
                _signal_group(process.pid, signal.SIGTERM)
                try:
                    process.wait(grace_s)
                except subprocess.TimeoutExpired:
                    _signal_group(process.pid, signal.SIGKILL)
                    process.wait()
            # Stubs that outlived the server would hold shared memory and ports.
            _signal_group(process.pid, signal.SIGKILL)
            return process.returncode
        finally:
            self._cleanup()

    def _cleanup(self) -> None:
        if self._log is not None:
            self._log.close()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> Self:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<TritonServer {self.http_url} grpc={self.grpc_url} pid={self.pid} {state}>"


def _is_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return int(response.status) == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False  # not listening yet, or answering "not ready" (HTTPError is a URLError)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
