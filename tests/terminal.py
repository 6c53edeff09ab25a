"""Run a command with its stderr on a pseudo-terminal, as a person at a terminal runs it.

The progress tests (tests/unit/test_progress.py, the archive's in tests/integration) compare
what a command draws there with what it prints on a pipe; stdout is always a pipe.
"""

from __future__ import annotations

import fcntl
import os
import select
import struct
import subprocess
import termios
import time
from collections.abc import Mapping, Sequence
from pathlib import Path


def run_on_terminal(
    cmd: Sequence[str], env: Mapping[str, str], cwd: Path, timeout_s: float = 120.0
) -> tuple[int, bytes, bytes]:
    """(exit code, stdout, what reached the terminal) of `cmd` with stderr on a pty.

    The pty turns each \\n into \\r\\n (as a terminal does); a bare \\r is a redraw."""
    master, slave = os.openpty()
    # A real terminal has a size; a fresh pty is 0x0, where tqdm draws a bar 0 columns wide.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    try:
        proc = subprocess.Popen(
            list(cmd), cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=slave,
        )  # fmt: skip
        os.close(slave)
        slave = -1
        err = _read_until_closed(master, time.monotonic() + timeout_s)
        out, _ = proc.communicate(timeout=timeout_s)
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    return proc.returncode, out, err


def _read_until_closed(fd: int, deadline: float) -> bytes:
    """Everything written to the pty until its last writer closes it (EIO on Linux). Read
    while the command runs: Linux drops what is unread when the last writer closes."""
    got = b""
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # the command (and its children) closed the slave side
            return got
        if not chunk:
            return got
        got += chunk
    raise AssertionError(f"pty still open after the deadline; read so far: {got!r}")


def redraws(err: bytes) -> bool:
    """Did the terminal get a bare carriage return (a bar redrawn in place)?"""
    return b"\r" in err.replace(b"\r\n", b"\n")
