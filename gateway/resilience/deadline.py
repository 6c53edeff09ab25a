"""One time budget per request (the type lives on the ground floor, `gateway.types`)."""

from gateway.types import Deadline

__all__ = ["Deadline"]
