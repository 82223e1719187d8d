"""Keep the server's memory flat under many threads: cap glibc's malloc arenas.

glibc gives each thread that contends for the allocator an arena of its own,
up to 8 per core, and hands memory back to the system only from an arena's
top.  The app's many short-lived threads (decoding snapshots, encoding
renders, exports, one per WebSocket) so leave memory scattered over many
arenas, and the server's memory grows for hours; with two arenas it stays
flat at the same speed (`python -m bench.loadtest --soak` shows it; the
figures: docs/performance.md).

`limit_malloc_arenas` is for a program's entry point (app.py, the load
test's server): it sets a process-wide allocator option, as the
MALLOC_ARENA_MAX environment variable would, and does nothing where the C
library is not glibc or the variable is already set.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_ARENA_MAX = -8  # glibc's mallopt parameter number (malloc.h)
ARENAS = 2


def limit_malloc_arenas(arenas: int = ARENAS) -> bool:
    """Cap glibc's malloc arenas at `arenas`; True when the cap was set here."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False  # the person running it chose
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return False  # not glibc (musl, macOS): nothing to cap
    return bool(libc.mallopt(M_ARENA_MAX, arenas))
