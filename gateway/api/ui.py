"""`GET /admin/ui`: the live status page for operators, and `GET /admin/ui.json`, its data.

Read-only and under /admin/, so whatever guards the admin API guards it too. The HTML is
rendered on the server from a Jinja2 template (gateway/api/templates/, autoescaped: route
files and reload errors are operator-written text) with inline CSS and no script at all; a
meta refresh reloads it every few seconds. The Content-Security-Policy forbids every external
asset, so the page works on an air-gapped network and cannot leak to one.
"""

from __future__ import annotations

import datetime as dt
import functools

import jinja2
from aiohttp import web

from gateway.api.middleware import json_response
from gateway.api.status import status_view

REFRESH_S = 5
NONE = "-"  # a value not measured yet
_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'"

routes = web.RouteTableDef()


@routes.get("/admin/ui")
async def status_page(request: web.Request) -> web.Response:
    html = (
        templates()
        .get_template("status.html")
        .render(view=status_view(request.app), refresh_s=REFRESH_S)
    )
    return web.Response(
        text=html,
        content_type="text/html",
        headers={"Cache-Control": "no-store", "Content-Security-Policy": _CSP},
    )


@routes.get("/admin/ui.json")
async def status_data(request: web.Request) -> web.Response:
    return json_response(status_view(request.app), headers={"Cache-Control": "no-store"})


@functools.cache  # compiled templates are immutable; loading them once per process is enough
def templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("gateway.api", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,  # a misspelt field fails the tests, not the operator
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(num=_num, pct=_pct, when=_when)
    return env


def _num(value: float | int | None, digits: int = 3) -> str:
    if value is None:
        return NONE
    if not isinstance(value, float):
        return str(value)
    text = f"{value:.{digits}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text  # 25.0 -> "25"


def _pct(value: float | None, digits: int = 2) -> str:
    return NONE if value is None else f"{value * 100:.{digits}f} %"


def _when(ts: float | None) -> str:
    if ts is None:
        return NONE
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
