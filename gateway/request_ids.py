"""Request ids for requests that bring none (or bring one we will not echo): 32 lowercase hex
digits of os.urandom, like ``uuid.uuid4().hex``, at a fraction of its cost.

A client's own id (the X-Request-ID header) is kept when `is_client_request_id`: 1 to 128
visible ASCII characters, the rule the /v1 body's ``request_id`` follows
(gateway/api/schemas.py), since the id is echoed in a response header, in JSON and in logs.

``uuid4()`` makes one getrandom syscall and builds a UUID object per id (~1.7 us; 1-1.5 % of
the gateway's CPU per prediction under load, py-spy in docs/benchmarks.md). Here 4 KiB of
entropy is drawn at once, hex-encoded once, and handed out 32 digits at a time (~0.2 us). A
forked child throws the parent's unused digits away (``os.register_at_fork``), so two
processes never hand out the same id.
"""

from __future__ import annotations

import os
import re
import weakref
from collections.abc import Callable

#: The longest client request id kept (as the /v1 body's request_id, schemas.MAX_ID).
MAX_CLIENT_ID = 128

# fullmatch: "$" would also match before a trailing newline.
_CLIENT_ID = re.compile(rf"[!-~]{{1,{MAX_CLIENT_ID}}}")


def is_client_request_id(value: str) -> bool:
    """Whether a client's request id may be used as is: visible ASCII, 1..MAX_CLIENT_ID."""
    return _CLIENT_ID.fullmatch(value) is not None


class RequestIds:
    """``ids()`` -> a fresh random id (128 bits as 32 hex digits)."""

    def __init__(self, urandom: Callable[[int], bytes] = os.urandom, per_draw: int = 256) -> None:
        self._urandom = urandom
        self._draw = 16 * per_draw
        self._hex = ""
        self._pos = 0
        ref = weakref.ref(self)

        def forget() -> None:  # in a forked child: never reuse what the parent may hand out
            ids = ref()
            if ids is not None:
                ids._hex, ids._pos = "", 0

        os.register_at_fork(after_in_child=forget)

    def __call__(self) -> str:
        pos = self._pos
        if pos >= len(self._hex):
            self._hex, pos = self._urandom(self._draw).hex(), 0
        self._pos = pos + 32
        return self._hex[pos : pos + 32]
