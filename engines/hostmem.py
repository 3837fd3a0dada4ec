"""Give freed tensor memory back to the operating system while training on the CPU.

glibc serves large allocations with ``mmap`` and unmaps them when freed, but it raises that
threshold (up to 32 MiB) each time such a block is freed, after which blocks of that size come
from the heap and stay mapped when freed. A training step frees and re-allocates tensors of
tens of MiB in a changing pattern (one local-learning module after another), so the process
kept up to 0.6 GB more resident than the tensors alive at any time. Fixing the threshold stops
the drift: every block of at least ``threshold`` bytes is mapped on its own and returned when
freed. Costs one ``mmap``/``munmap`` pair per such block, which is small beside the
convolutions that fill it. Torch's CUDA allocator keeps its own cache and is not affected.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3  # mallopt parameter (glibc <malloc.h>)
DEFAULT_THRESHOLD = 128 * 1024  # glibc's own starting value


def return_large_frees_to_os(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes for this process. True when set;
    False where the C library is not glibc (macOS, Windows, musl), where nothing changes."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, int(threshold)))
