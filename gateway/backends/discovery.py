"""Pool members from DNS (a headless Service name resolves to one address per Triton pod)
or from a servers file (a ConfigMap key), without a restart.

Every ``interval_s`` each `dns:` server spec is resolved again (``loop.getaddrinfo``, or an
injected resolver in tests). A new address joins the pool at once; an address that is gone
drains (no new calls; the calls in flight finish) and is then closed. A failed lookup keeps
the members there are: a DNS blip must not empty the pool, and the health check already
takes a dead server out of rotation.

`ServersFile` does the same for ``triton.servers_file``: a YAML list of
``{name, grpc_url, models, metrics_url}`` re-read every interval; an entry that is gone drains.
A member is known by its name: to move a server to a new address, give it a new name.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import yaml

from gateway.backends.base import Backend
from gateway.backends.pool import BackendPool, PoolMember

log = structlog.get_logger(__name__)

#: (host, port) -> the addresses it resolves to now.
Resolver = Callable[[str, int], Awaitable[list[str]]]
#: (member name, grpc host:port) -> the backend that talks to it.
BackendFactory = Callable[[str, str], Backend]

__all__ = ["DnsDiscovery", "DnsSource", "ServersFile", "getaddrinfo_resolver"]

FILE_SOURCE = "file"


async def getaddrinfo_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def _hostport(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


@dataclass(frozen=True)
class DnsSource:
    """One `dns:` server spec: members ``<name>/<address>`` on ``port``."""

    name: str
    host: str
    port: int
    metrics_port: int = 0  # 0: no load scraping for these members
    models: frozenset[str] = frozenset()

    @classmethod
    def parse(
        cls, name: str, dns: str, metrics_port: int = 0, models: Iterable[str] = ()
    ) -> DnsSource:
        host, sep, port = dns.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"server {name!r}: dns must be host:port, got {dns!r}")
        return cls(name, host, int(port), metrics_port, frozenset(models))


class DnsDiscovery:
    def __init__(
        self,
        pool: BackendPool,
        sources: Iterable[DnsSource],
        make_backend: BackendFactory,
        resolver: Resolver = getaddrinfo_resolver,
        interval_s: float = 5.0,
    ) -> None:
        self.pool = pool
        self.sources = list(sources)
        self.make_backend = make_backend
        self.resolver = resolver
        self.interval_s = interval_s
        self._failing: set[str] = set()

    async def refresh(self) -> None:
        """Resolve every source once and bring the pool's members in line."""
        for source in self.sources:
            try:
                addresses = await self.resolver(source.host, source.port)
            except OSError as exc:
                if source.name not in self._failing:
                    log.warning("dns_lookup_failed", server=source.name, error=str(exc))
                self._failing.add(source.name)
                continue
            self._failing.discard(source.name)
            self._apply(source, addresses)

    def _apply(self, source: DnsSource, addresses: list[str]) -> None:
        wanted = {f"{source.name}/{a}": a for a in addresses}
        for member in list(self.pool.members):
            if member.source == source.name and member.name not in wanted:
                self.pool.remove_member(member.name)
        present = {m.name: m for m in self.pool.members}
        for name, address in wanted.items():
            if name in present:
                if present[name].draining:  # back before it finished draining
                    self.pool.add_member(present[name])
                continue
            metrics = (
                f"http://{_hostport(address, source.metrics_port)}/metrics"
                if source.metrics_port
                else ""
            )
            self.pool.add_member(
                PoolMember(
                    name,
                    self.make_backend(name, _hostport(address, source.port)),
                    source.models,
                    metrics_url=metrics,
                    source=source.name,
                )
            )

    async def run(self) -> None:
        """Background task: `refresh` every ``interval_s`` until cancelled."""
        while True:
            await self.refresh()
            await asyncio.sleep(self.interval_s)


class ServersFile:
    """Members listed in a YAML file, re-read every ``interval_s``."""

    def __init__(
        self, pool: BackendPool, path: Path, make_backend: BackendFactory, interval_s: float = 5.0
    ) -> None:
        self.pool = pool
        self.path = path
        self.make_backend = make_backend
        self.interval_s = interval_s
        self._failing = False

    def read(self) -> dict[str, dict[str, Any]]:
        """name -> entry; raises ValueError (or OSError) on a file that cannot be used."""
        data = yaml.safe_load(self.path.read_text()) or []
        if not isinstance(data, list):
            raise ValueError("expected a list of {name, grpc_url, models, metrics_url}")
        entries: dict[str, dict[str, Any]] = {}
        for i, entry in enumerate(data):
            if not isinstance(entry, dict) or not entry.get("name") or not entry.get("grpc_url"):
                raise ValueError(f"entry {i}: needs name and grpc_url")
            unknown = set(entry) - {"name", "grpc_url", "models", "metrics_url"}
            if unknown:
                raise ValueError(f"entry {i}: unknown key(s) {sorted(unknown)}")
            entries[str(entry["name"])] = entry
        return entries

    def refresh(self) -> None:
        """Bring the file's members in line with it; a bad file changes nothing."""
        try:
            wanted = self.read()
        except (OSError, ValueError, yaml.YAMLError) as exc:
            if not self._failing:
                log.warning("servers_file_unusable", path=str(self.path), error=str(exc))
            self._failing = True
            return
        self._failing = False
        for member in list(self.pool.members):
            if member.source == FILE_SOURCE and member.name not in wanted:
                self.pool.remove_member(member.name)
        present = {m.name: m for m in self.pool.members}
        for name, entry in wanted.items():
            if name in present:
                if present[name].draining:
                    self.pool.add_member(present[name])
                continue
            self.pool.add_member(
                PoolMember(
                    name,
                    self.make_backend(name, str(entry["grpc_url"])),
                    frozenset(str(m) for m in entry.get("models") or ()),
                    metrics_url=str(entry.get("metrics_url") or ""),
                    source=FILE_SOURCE,
                )
            )

    async def run(self) -> None:
        """Background task: `refresh` every ``interval_s`` until cancelled."""
        while True:
            self.refresh()
            await asyncio.sleep(self.interval_s)
