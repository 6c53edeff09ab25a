"""The aiohttp side of the guard: a middleware that admits each REST request or refuses it.

It sits inside `request_context` (gateway.api.middleware), which turns the Unauthorized,
Forbidden and RateLimited it raises into JSON errors with their headers. The admitted
Principal is left on the request (`PRINCIPAL`) for handlers that record who acted (feedback
labels); the access log gets the key id, never the key.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Middleware

from gateway.api.keys import LOG_FIELDS
from gateway.api.middleware import Handler
from gateway.security.authn import ANONYMOUS, Principal
from gateway.security.guard import Guard

PRINCIPAL = web.RequestKey("principal", Principal)
GUARD = web.AppKey("guard", Guard)


def principal_of(request: web.Request) -> Principal:
    """Who made ``request``: its key's Principal, or ANONYMOUS when auth is off."""
    return request.get(PRINCIPAL, ANONYMOUS)


def auth_middleware(guard: Guard) -> Middleware:
    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        scope = guard.scope_for(request.path)
        if scope is None:
            return await handler(request)
        presented = request.headers.get("Authorization") or request.headers.get("X-API-Key")
        principal = guard.authenticator.authenticate(presented, scope)
        request[PRINCIPAL] = principal
        fields = request.get(LOG_FIELDS)
        if fields is not None:
            fields["key_id"] = principal.key_id  # before the limit: a 429 names its caller
        decision = await guard.limit(principal, scope)
        response = await handler(request)
        if decision is not None:
            response.headers.update(decision.headers())
        return response

    return authenticate
