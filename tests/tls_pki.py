"""Self-signed certificates made with `openssl req` for the TLS tests (no fixtures on disk).

`cryptography` is not a dependency, and the openssl CLI is on every CI image; a test that
cannot find it calls `tests.conftest.unavailable` (skip locally, fail under CI).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import unavailable


@dataclass(frozen=True)
class CertPair:
    cert: Path
    key: Path


def self_signed(directory: Path, name: str, cn: str = "localhost") -> CertPair:
    """A P-256 certificate valid for localhost and 127.0.0.1, its own CA."""
    openssl = shutil.which("openssl")
    if openssl is None:
        unavailable("openssl is not installed (apt-get install openssl)")
    directory.mkdir(parents=True, exist_ok=True)
    pair = CertPair(directory / f"{name}.crt", directory / f"{name}.key")
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1", "-subj", f"/CN={cn}",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(pair.key), "-out", str(pair.cert)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return pair
