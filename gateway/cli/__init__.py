"""The one command line: ``python -m gateway`` (also installed as ``switchyard``).

Every subcommand lives in this package, one module each (routes, models, rollout, drift,
data, gpu, keys); this module holds the parser and the stack's own commands.

Subcommands:
  triton  launch the nvidia-pytriton wheel's tritonserver on a model repository
  serve   run the gateway against an already running Triton
  up      the local stack of ``make run``: tritonserver, then the gateway, in one process
  keys    create, list and revoke API keys (gateway/security)
  audit   tail the audit trail of route, weight and key changes (gateway/audit.py)

Gateway modules are imported inside the subcommands that need them, so ``triton`` works on
its own and ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from gateway.tritonserver import TritonLaunchError, TritonOptions, TritonPorts, TritonServer

if TYPE_CHECKING:
    from gateway.config import Settings

DEFAULT_CONFIG = "configs/gateway.yaml"
TRITON_LOG = Path("var/log/tritonserver.log")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except TritonLaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="switchyard", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    triton = sub.add_parser("triton", help="launch tritonserver on a model repository")
    triton.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    _add_triton_args(triton, prefix="")
    triton.add_argument("--model-control-mode", choices=("none", "poll", "explicit"), default=None)
    triton.add_argument(
        "--load-model",
        action="append",
        default=[],
        metavar="MODEL",
        help="model to load at start (explicit mode; repeatable; '*' for all)",
    )
    triton.add_argument("--log-verbose", type=int, default=0)
    triton.set_defaults(handler=cmd_triton)

    serve = sub.add_parser("serve", help="run the gateway against a running Triton")
    _add_gateway_args(serve)
    serve.set_defaults(handler=cmd_serve)

    up = sub.add_parser("up", help="tritonserver + gateway in one process (make run)")
    _add_gateway_args(up)
    _add_triton_args(up, prefix="triton-")
    # A second tritonserver for the fallback models (triton.fallback_models), so the ladder's
    # first rung survives the primary's death.
    up.add_argument("--fallback-http-port", type=int, default=8010)
    up.add_argument("--fallback-grpc-port", type=int, default=8011)
    up.add_argument("--fallback-metrics-port", type=int, default=8012)
    up.add_argument("--no-fallback-triton", action="store_true", help="one Triton only")
    up.set_defaults(handler=cmd_up)

    from gateway.cli.routes import add_routes_parser  # argparse only; routing loads lazily

    add_routes_parser(sub)
    from gateway.cli.models import add_models_parser

    add_models_parser(sub)  # models publish / list / verify / retire / validate
    from gateway.cli.data import add_parsers as add_data_parsers

    add_data_parsers(sub)  # labels join, features load
    from gateway.cli.rollout import add_promote_parser, add_rollout_parser

    add_promote_parser(sub)  # promote <model>: the metric-gated canary controller
    add_rollout_parser(sub)  # rollout report: the canary's progress as one HTML page
    from gateway.cli.drift import add_drift_parser

    add_drift_parser(sub)  # drift report: the features that drift most, from /metrics
    from gateway.cli.gpu import add_gpu_parser

    add_gpu_parser(sub)  # gpu plan: GPU placement (dedicated or MPS-packed)
    from gateway.cli.keys import add_keys_parser

    add_keys_parser(sub)  # keys create|list|revoke: the API key file (auth.keys_file)
    from gateway.cli.audit import add_audit_parser

    add_audit_parser(sub)  # audit tail: who changed routes, weights and keys (gateway/audit.py)
    return parser


def _add_triton_args(parser: argparse.ArgumentParser, prefix: str) -> None:
    parser.add_argument(f"--{prefix}http-port", type=int, default=8000)
    parser.add_argument(f"--{prefix}grpc-port", type=int, default=8001)
    parser.add_argument(f"--{prefix}metrics-port", type=int, default=8002)
    parser.add_argument(f"--{prefix}address", default="127.0.0.1", help="address Triton binds to")
    parser.add_argument(
        f"--{prefix}log-file", type=Path, default=TRITON_LOG, help="tritonserver output"
    )


def _add_gateway_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=Path(DEFAULT_CONFIG))
    parser.add_argument("--host", default=None, help="override server.host")
    parser.add_argument("--port", type=int, default=None, help="override server.port")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="gateway processes sharing the port (SO_REUSEPORT); SIGHUP reloads them one by one",
    )


def cmd_triton(args: argparse.Namespace) -> int:
    server = TritonServer(
        TritonOptions(
            model_repository=args.model_repository,
            ports=TritonPorts(args.http_port, args.grpc_port, args.metrics_port),
            address=args.address,
            model_control_mode=args.model_control_mode,
            load_models=tuple(args.load_model),
            log_verbose=args.log_verbose,
        ),
        log_file=args.log_file,
    )
    with _running(server):
        _print_triton(server)
        print("Ctrl-C to stop", flush=True)
        code = server.wait()  # returns only if tritonserver dies on its own
        print(f"tritonserver exited with code {code}; log: {server.log_path}", file=sys.stderr)
        return code or 1


def serve(settings: Settings, workers: int = 1) -> int:
    """Run the gateway until SIGINT/SIGTERM (blocking); ``workers`` > 1 supervises that many
    processes sharing the ports (gateway.workers). Returns the exit status."""
    if workers > 1:
        from gateway.log import configure_logging
        from gateway.workers import Supervisor

        configure_logging(settings.log.level, settings.log.json)
        return Supervisor(settings, workers).run()
    from gateway.serving import serve_one

    serve_one(settings)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _load_settings(args)
    if settings is None:
        return 2
    if args.workers < 1:
        print("error: --workers must be at least 1", file=sys.stderr)
        return 2
    return serve(settings, workers=args.workers)


def cmd_up(args: argparse.Namespace) -> int:
    from gateway.config import ServerSpec

    settings = _load_settings(args)
    if settings is None:
        return 2
    # Every model loaded, in explicit mode: same as the tests, and lets the gateway load and
    # unload versions through Triton's repository API.
    server = _local_triton(
        args,
        settings,
        TritonPorts(args.triton_http_port, args.triton_grpc_port, args.triton_metrics_port),
        ("*",),
        args.triton_log_file,
    )
    fallback = _fallback_triton(args, settings)
    with _running(server, *([fallback] if fallback else [])):
        _print_triton(server)
        servers: tuple[ServerSpec, ...] = ()
        if fallback is not None:
            print("fallback  ", end="")
            _print_triton(fallback)
            models = settings.triton.fallback_models
            servers = (
                ServerSpec("primary", server.grpc_url, http_url=server.http_url),
                ServerSpec(
                    "fallback", fallback.grpc_url, models=models, http_url=fallback.http_url
                ),
            )
        settings = dataclasses.replace(
            settings,
            triton=dataclasses.replace(
                settings.triton,
                grpc_url=server.grpc_url,
                http_url=server.http_url,
                metrics_url=server.metrics_url,
                servers=servers or settings.triton.servers,
            ),
        )
        host = settings.server.host
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
        url = f"http://{shown}:{settings.server.port}"
        print(f"gateway   {url}  (Ctrl-C stops the gateway, then Triton)")
        if settings.server.grpc_port:
            print(f"grpc      {shown}:{settings.server.grpc_port}  (OIP, e.g. tritonclient.grpc)")
        print(f"try       curl -s {url}/readyz")
        print(
            f"          curl -s {url}/v1/predict -H 'content-type: application/json' "
            "-d @configs/examples/predict-risk.json",
            flush=True,
        )
        # blocks; aiohttp (or the worker supervisor) handles SIGINT/SIGTERM and returns
        return serve(settings, workers=args.workers)


def _fallback_triton(args: argparse.Namespace, settings: Settings) -> TritonServer | None:
    """The local stack's own Triton for the fallback models (explicit mode, only those)."""
    models = settings.triton.fallback_models
    if args.no_fallback_triton or not models:
        return None
    return _local_triton(
        args,
        settings,
        TritonPorts(args.fallback_http_port, args.fallback_grpc_port, args.fallback_metrics_port),
        tuple(models),
        args.triton_log_file.with_name("tritonserver-fallback.log"),
    )


def _local_triton(
    args: argparse.Namespace,
    settings: Settings,
    ports: TritonPorts,
    models: tuple[str, ...],
    log_file: Path,
) -> TritonServer:
    """A tritonserver of the local stack on the shipped repository, explicit model control;
    with ``telemetry.otlp_endpoint`` set, it traces to the same collector as the gateway."""
    from gateway.tracing import traces_url

    telemetry = settings.telemetry
    return TritonServer(
        TritonOptions(
            model_repository=settings.routing.model_repository,
            ports=ports,
            address=args.triton_address,
            model_control_mode="explicit",
            load_models=models,
            trace_url=traces_url(telemetry.otlp_endpoint) if telemetry.otlp_endpoint else "",
            trace_export_delay_ms=telemetry.export_delay_ms,
        ),
        log_file=log_file,
    )


def _load_settings(args: argparse.Namespace) -> Settings | None:
    from gateway.config import ConfigError, load_settings

    try:
        return load_settings(args.config, host=args.host, port=args.port)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def _print_triton(server: TritonServer) -> None:
    print(f"triton    http {server.http_url}  grpc {server.grpc_url}  metrics {server.metrics_url}")
    print(f"          log {server.log_path}", flush=True)


@contextmanager
def _running(server: TritonServer, *more: TritonServer) -> Iterator[TritonServer]:
    """Start ``server`` (and ``more``, all at once) and wait until ready; stop them on the
    way out, whatever happens.

    SIGTERM becomes KeyboardInterrupt, so Ctrl-C and ``kill`` unwind the same way. While
    stopping, both are ignored: the stop is bounded (SIGTERM, then SIGKILL after a grace
    period) and cutting it short would orphan tritonserver, which runs in its own session.
    """

    def interrupt(signum: int, frame: FrameType | None) -> Any:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    servers = (server, *more)
    try:
        for s in servers:
            s.start()  # in parallel: each takes seconds to load its models
        for s in servers:
            s.wait_ready()
        yield server
    finally:
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        try:
            for s in reversed(servers):
                s.stop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
