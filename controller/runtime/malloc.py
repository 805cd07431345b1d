"""glibc's allocator, set for a long-running process of many threads that caches many small objects.

glibc gives each thread that contends for the heap an arena of its own (up to 8 per core), and raises its mmap
threshold as large blocks are freed: after the controller's list pages and its informer, worker and source
threads, freed memory stays spread over arenas and the heap instead of going back to the OS (measured in
bench/bench_controller.py: peak RSS after a restart 122 MB with the defaults, 115 MB with two arenas). The usual
remedy for Python services (MALLOC_ARENA_MAX=2), applied from within so that every way of starting the controller
gets it; an environment that sets MALLOC_ARENA_MAX itself is left alone, as is any libc other than glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
ARENAS = 2
# Blocks this large are mapped and unmapped on their own (a list page's JSON), rather than kept in the heap.
MMAP_THRESHOLD_BYTES = 256 * 1024


def tune_for_long_running(arenas: int = ARENAS, mmap_threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Limit glibc's arenas and fix its mmap threshold; call before the threads start. False if not applied."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (musl has no mallopt): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = mallopt(_M_ARENA_MAX, arenas) == 1 and mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
    if not applied:
        log.debug("mallopt refused the arena and mmap settings; the allocator's defaults stay")
    return applied
