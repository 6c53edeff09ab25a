"""The status page in a real headless Chromium, served by a real gateway process in front of
the session's tritonserver: it renders every route with its weights, and after
`python -m gateway routes set-weight` it shows the new weight (hot reload, then the page's
own refresh)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest

from gateway.tritonserver import TritonServer
from tests.conftest import unavailable
from tests.integration.conftest import GatewayProcess, start_gateway, stop_gateway, wait_http_ok

BROWSERS = ("chromium", "chromium-browser")


@pytest.fixture(scope="session")
def chromium() -> str:
    for name in BROWSERS:
        if found := shutil.which(name):
            return found
    unavailable("chromium not installed (`make deps` as root, or `apt-get install chromium`)")


class ArmWeights(HTMLParser):
    """(route, arm) -> the weight text of the status page's arm rows."""

    def __init__(self) -> None:
        super().__init__()
        self.weights: dict[tuple[str, str], str] = {}
        self._row: tuple[str, str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "tr" and a.get("class") == "arm":
            self._row = (a.get("data-route") or "", a.get("data-arm") or "")
        elif tag == "td" and self._row is not None and a.get("data-weight") is not None:
            self.weights[self._row] = a["data-weight"] or ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr":
            self._row = None


def browse(chromium: str, profile: Path, url: str, *flags: str) -> str:
    """Chromium's rendered DOM of `url` (or what a flag such as --screenshot writes)."""
    cmd = [
        chromium, "--headless", "--disable-gpu", "--no-sandbox", "--disable-dev-shm-usage",
        "--no-first-run", f"--user-data-dir={profile}", *flags, url,
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    return done.stdout.decode()


def weights_in(dom: str) -> dict[tuple[str, str], str]:
    parser = ArmWeights()
    parser.feed(dom)
    return parser.weights


@pytest.fixture
def gateway_on_copy(
    triton: TritonServer, repo_root: Path, tmp_path: Path
) -> Iterator[tuple[GatewayProcess, Path]]:
    routes = tmp_path / "routes"
    shutil.copytree(repo_root / "configs/routes", routes)
    (tmp_path / "gw").mkdir()
    gw = start_gateway(
        repo_root,
        tmp_path / "gw",
        triton.grpc_url,
        {
            "SWITCHYARD__ROUTING__ROUTES_DIR": str(routes),
            "SWITCHYARD__ROUTING__RELOAD_INTERVAL_S": "0.2",
            "SWITCHYARD__ROLLOUT__RECORD_DIR": str(tmp_path / "rollout"),
        },
    )
    try:
        wait_http_ok(f"{gw.url}/readyz", 60, gw.process, gw.log_file)
        yield gw, routes
    finally:
        stop_gateway(gw)


def test_status_page_shows_weights_and_follows_set_weight(
    chromium: str, gateway_on_copy: tuple[GatewayProcess, Path], repo_root: Path, tmp_path: Path
) -> None:
    gw, routes = gateway_on_copy
    url = f"{gw.url}/admin/ui"
    profile = tmp_path / "chromium-profile"
    dom = browse(chromium, profile, url, "--dump-dom")
    assert weights_in(dom) == {
        ("digits", "champion"): "100",
        ("risk", "champion"): "90",
        ("risk", "challenger:risk@1"): "10",
    }
    assert "no drift measured yet" in dom and "10 %: off the ladder" in dom  # no traffic yet

    edit = subprocess.run(
        [sys.executable, "-m", "gateway", "routes", "set-weight", "risk", "--version", "1",
         "--weight", "25", "--routes-dir", str(routes)],
        cwd=repo_root, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert edit.returncode == 0, edit.stderr

    deadline = time.monotonic() + 30
    while (seen := weights_in(dom := browse(chromium, profile, url, "--dump-dom")))[
        ("risk", "challenger:risk@1")
    ] != "25":
        assert time.monotonic() < deadline, f"the page never showed the new weight: {seen}"
    assert seen[("risk", "champion")] == "75"
    assert "25 %: step 2 of 4" in dom
    assert '<tr class="reload">' in dom and '<span class="badge ok">ok</span>' in dom

    png = tmp_path / "status.png"
    browse(chromium, profile, url, f"--screenshot={png}", "--window-size=1280,900")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
