"""Hot reload of a routes directory that is a Kubernetes ConfigMap volume.

The kubelet never edits a mounted file. It writes the new content into a fresh hidden
directory `..<timestamp>/`, points the `..data` symlink at it with one atomic rename, fixes
the visible per-file symlinks (`risk.yaml -> ..data/risk.yaml`), then deletes the old
directory (kubernetes pkg/volume/util/atomic_writer.go). Here a directory is built and swapped
the same way under the real app's RouteReloader, with a FakeBackend, and each swap must go live.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from itertools import count
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from gateway.api.admin import RELOADER
from gateway.app import build_app
from gateway.config import Settings
from tests.unit.fakes import toy_backend, write_repo

TOY_V1 = 'model: toy\nchampion: {target: toy, version: "1"}\n'
TOY_V2 = 'model: toy\nchampion: {target: toy, version: "2"}\n'


class KubeletVolume:
    """A ConfigMap volume laid out and updated the way the kubelet's atomic writer does it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir()
        self._serial = count()

    def publish(self, files: Mapping[str, str], *, finish: bool = True) -> None:
        """The kubelet's update; ``finish=False`` stops right after the `..data` swap, the
        moment when a removed key's visible symlink still exists and points at nothing."""
        old = self.root / "..data"
        old_dir = os.readlink(old) if old.is_symlink() else None
        stamp = time.strftime("..%Y_%m_%d_%H_%M_%S.", time.gmtime()) + f"{next(self._serial):09d}"
        (self.root / stamp).mkdir()
        for name, text in files.items():
            (self.root / stamp / name).write_text(text)
        tmp = self.root / "..data_tmp"
        os.symlink(stamp, tmp)
        os.replace(tmp, old)  # the one atomic step: every file changes at once
        for name in files:
            link = self.root / name
            if not link.is_symlink():
                os.symlink(f"..data/{name}", link)
        if not finish:
            return
        for link in self.root.iterdir():
            if not link.name.startswith("..") and link.name not in files:
                link.unlink()  # a key removed from the ConfigMap
        if old_dir is not None:
            for f in (self.root / old_dir).iterdir():
                f.unlink()
            (self.root / old_dir).rmdir()


async def poll(check: Callable[[], Awaitable[bool]], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "condition not reached before the deadline"
        await asyncio.sleep(0.01)


async def predict(client: TestClient, model: str = "toy") -> dict[str, Any]:
    body = {"model_name": model, "entity_id": "e1", "features": [1, 0, 0]}
    resp = await client.post("/v1/predict", data=io.BytesIO(json.dumps(body).encode()))
    assert resp.status == 200, await resp.text()
    return await resp.json()


def settings_on(tmp_path: Path, volume: KubeletVolume) -> Settings:
    s = write_repo(tmp_path)
    routing = dataclasses.replace(
        s.routing, routes_dir=volume.root, reload_interval_s=0.02, reload_on_sighup=False
    )
    return dataclasses.replace(s, routing=routing)


async def test_each_kubelet_symlink_swap_goes_live(tmp_path: Path, aiohttp_client) -> None:
    volume = KubeletVolume(tmp_path / "configmap")
    volume.publish({"toy.yaml": TOY_V2})
    client = await aiohttp_client(build_app(settings_on(tmp_path, volume), backend=toy_backend()))
    reloader = client.app[RELOADER]
    first = await predict(client)
    assert first["model_version"] == "2"

    # Three swaps in a row: the reloader must follow `..data`, not the directory it saw first
    # (each previous timestamp directory is deleted, as the kubelet does).
    for version, body in (("1", TOY_V1), ("2", TOY_V2), ("1", TOY_V1)):
        volume.publish({"toy.yaml": body})

        async def live(version: str = version) -> bool:
            return (await predict(client))["model_version"] == version

        await poll(live)
        assert reloader.last is not None and reloader.last.result == "ok", reloader.last

    # One route file per key, never a second copy through the hidden directories.
    assert sorted(r for r in reloader.ref.current.routes) == ["toy"]


async def test_keys_added_and_removed_by_a_swap(tmp_path: Path, aiohttp_client) -> None:
    volume = KubeletVolume(tmp_path / "configmap")
    volume.publish({"toy.yaml": TOY_V2})
    client = await aiohttp_client(build_app(settings_on(tmp_path, volume), backend=toy_backend()))
    reloader = client.app[RELOADER]
    canary = 'model: toy-canary\nchampion: {target: toy, version: "1"}\n'

    volume.publish({"toy.yaml": TOY_V2, "toy-canary.yaml": canary})

    async def added() -> bool:
        return "toy-canary" in reloader.ref.current.routes

    await poll(added)
    assert (await predict(client, "toy-canary"))["model_version"] == "1"

    volume.publish({"toy.yaml": TOY_V1})

    async def removed() -> bool:
        return "toy-canary" not in reloader.ref.current.routes

    await poll(removed)
    assert (await predict(client))["model_version"] == "1"
    assert reloader.last is not None and reloader.last.result == "ok", reloader.last


async def test_a_removed_key_is_gone_mid_swap_not_an_error(tmp_path: Path, aiohttp_client) -> None:
    """Between the `..data` swap and the removal of a dropped key's symlink, the link dangles.
    A reload then must see the new set of files, not reject the table as unreadable."""
    volume = KubeletVolume(tmp_path / "configmap")
    canary = 'model: toy-canary\nchampion: {target: toy, version: "1"}\n'
    volume.publish({"toy.yaml": TOY_V2, "toy-canary.yaml": canary})
    client = await aiohttp_client(build_app(settings_on(tmp_path, volume), backend=toy_backend()))
    reloader = client.app[RELOADER]
    assert "toy-canary" in reloader.ref.current.routes

    volume.publish({"toy.yaml": TOY_V1}, finish=False)
    assert (volume.root / "toy-canary.yaml").is_symlink()  # dangling, as on a real node
    result = await reloader.reload()
    assert result.result == "ok", result.error
    assert sorted(reloader.ref.current.routes) == ["toy"]
    assert (await predict(client))["model_version"] == "1"
