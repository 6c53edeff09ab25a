"""Weighted traffic splits between a champion and its challengers, random or sticky.

The bucket space is 10,000 buckets (weights have 0.01 % resolution). A sticky split hashes the
request's key (usually `entity_id`) with blake2b, salted by the route name, into a bucket: the
same entity lands in the same bucket on every replica and after every restart, so it sees the
same arm for as long as the weights stay put. With a secret (`routing.sticky_salt`, the same
on every replica) the salt is HMAC(secret, route name): a client can then no longer compute
which entity ids land in the challenger and pick its arm. Setting or changing the secret
reassigns every sticky entity once, so do it while no challenger carries traffic. A random
split draws the bucket from an injected `random.Random`.

Layout, chosen so that a weight change moves as few entities as possible: the champion fills
buckets from the bottom, challengers from the top in file order. Raising or lowering one
challenger's weight moves only the entities in the changed slice between it and the champion
(plus the shift of challengers listed after it); adding a challenger at the end of the list
takes its slice from the champion only and moves nobody else.
"""

from __future__ import annotations

import bisect
import hashlib
import hmac
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.routing.table import Target

BUCKETS = 10_000


def bucket_of(key: str, salt: str) -> int:
    """A stable bucket in [0, BUCKETS) for ``key`` (stable across processes and versions)."""
    digest = hashlib.blake2b(key.encode(), digest_size=8, key=salt.encode()[:64]).digest()
    return int.from_bytes(digest, "big") % BUCKETS


def sticky_salt(route_name: str, secret: str = "") -> str:
    """The bucket salt of a route: its name, or keyed by the deployment's secret (64 hex
    characters: exactly blake2b's longest key, so no part of the secret is cut off)."""
    if not secret:
        return route_name
    return hmac.new(secret.encode(), route_name.encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class Arm:
    name: str
    target: Target
    buckets: int  # share of the BUCKETS bucket space


@dataclass(frozen=True, slots=True)
class Split:
    salt: str
    arms: tuple[Arm, ...]  # champion first, then challengers in file order
    sticky: str | None
    #: Sorted exclusive upper bounds of each non-empty arm's slice, for bisect.
    bounds: tuple[int, ...]
    owners: tuple[Arm, ...]

    @classmethod
    def layout(
        cls, salt: str, champion: Arm, challengers: tuple[Arm, ...], sticky: str | None
    ) -> Split:
        slices: list[tuple[int, int, Arm]] = [(0, champion.buckets, champion)]
        top = BUCKETS
        for arm in challengers:
            slices.append((top - arm.buckets, top, arm))
            top -= arm.buckets
        slices = sorted((s for s in slices if s[1] > s[0]), key=lambda s: s[0])
        return cls(
            salt=salt,
            arms=(champion, *challengers),
            sticky=sticky,
            bounds=tuple(hi for _, hi, _ in slices),
            owners=tuple(a for _, _, a in slices),
        )

    def bucket(self, key: str | None, rng: random.Random) -> int:
        """Sticky: the key's hash bucket. Random: a bucket drawn from ``rng``."""
        if self.sticky is not None and key is not None:
            return bucket_of(key, self.salt)
        return rng.randrange(BUCKETS)

    def pick(self, key: str | None, rng: random.Random) -> Arm:
        """A sticky split sends requests without the key to the champion: deterministic (same
        request, same version on every replica), and no entity is exposed by chance."""
        if self.sticky is not None and key is None:
            return self.arms[0]
        return self.arm_at(self.bucket(key, rng))

    def arm_at(self, bucket: int) -> Arm:
        return self.owners[bisect.bisect_right(self.bounds, bucket)]

    def weights(self) -> dict[str, float]:
        """Percent of traffic per arm name."""
        return {a.name: a.buckets * 100 / BUCKETS for a in self.arms}
