"""Guard: authentication, then the rate limit, as one call for every protocol adapter.

The REST middleware (gateway.security.rest) and the gRPC server call `Guard.admit` with
what the client presented (the `Authorization` value or `authorization` metadata) and the
scope of the endpoint; it returns the Principal and the rate-limit decision, or raises
Unauthorized / Forbidden / RateLimited.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.security.authn import Authenticator, Principal, grpc_scope, required_scope
from gateway.security.ratelimit import Decision, RateLimiter


@dataclass
class Guard:
    authenticator: Authenticator
    limiter: RateLimiter | None = None
    protect_metrics: bool = False
    protect_metadata: bool = False

    def scope_for(self, path: str) -> str | None:
        return required_scope(path, self.protect_metrics, self.protect_metadata)

    def grpc_scope_for(self, method: str) -> str | None:
        return grpc_scope(method, self.protect_metadata)

    async def admit(
        self, presented: str | None, scope: str | None
    ) -> tuple[Principal, Decision | None]:
        principal = self.authenticator.authenticate(presented, scope)
        return principal, await self.limit(principal, scope)

    async def limit(self, principal: Principal, scope: str | None) -> Decision | None:
        """Count one request of an authenticated caller; RateLimited (429) past its share."""
        if self.limiter is None or scope is None:
            return None
        return await self.limiter.admit(principal)
