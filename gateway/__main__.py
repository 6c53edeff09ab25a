"""Command line: ``python -m gateway`` (also installed as ``switchyard``).

Subcommands:
  triton  launch the nvidia-pytriton wheel's tritonserver on a model repository
  serve   run the gateway against an already running Triton
  up      the local stack of ``make run``: tritonserver, then the gateway, in one process

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
    up.set_defaults(handler=cmd_up)

    # Other engineers add their subcommands here: routes, labels, features, promote.
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


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.app import serve

    settings = _load_settings(args)
    if settings is None:
        return 2
    serve(settings)
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from gateway.app import serve

    settings = _load_settings(args)
    if settings is None:
        return 2
    server = TritonServer(
        TritonOptions(
            model_repository=settings.routing.model_repository,
            ports=TritonPorts(
                args.triton_http_port, args.triton_grpc_port, args.triton_metrics_port
            ),
            address=args.triton_address,
            # Explicit mode with everything loaded: same as the tests, and lets the gateway
            # load and unload versions through Triton's repository API.
            model_control_mode="explicit",
            load_models=("*",),
        ),
        log_file=args.triton_log_file,
    )
    with _running(server):
        _print_triton(server)
        settings = dataclasses.replace(
            settings,
            triton=dataclasses.replace(
                settings.triton,
                grpc_url=server.grpc_url,
                http_url=server.http_url,
                metrics_url=server.metrics_url,
            ),
        )
        host = settings.server.host
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{settings.server.port}"
        print(f"gateway   {url}  (Ctrl-C stops the gateway, then Triton)")
        print(f"try       curl -s {url}/readyz")
        print(
            f"          curl -s {url}/v1/predict -H 'content-type: application/json' "
            "-d @configs/examples/predict-risk.json",
            flush=True,
        )
        serve(settings)  # blocks; aiohttp handles SIGINT/SIGTERM and returns
    return 0


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
def _running(server: TritonServer) -> Iterator[TritonServer]:
    """Start ``server`` and wait until ready; stop it on the way out, whatever happens.

    SIGTERM becomes KeyboardInterrupt, so Ctrl-C and ``kill`` unwind the same way. While
    stopping, both are ignored: the stop is bounded (SIGTERM, then SIGKILL after a grace
    period) and cutting it short would orphan tritonserver, which runs in its own session.
    """

    def interrupt(signum: int, frame: FrameType | None) -> Any:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        server.wait_ready()
        yield server
    finally:
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        try:
            server.stop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
