"""Process memory: giving freed heap back between classes, and RSS readings.

    from dream_dist.memory import release_free_memory, rss_mb, peak_rss_mb
    for c in classes:
        parts[c] = work(images_of(c))
        release_free_memory()     # after each class of a per-class loop

Why (issue 21, "bounded memory"). A DDOQ Ray task reached 20.9 GB for 500 stress classes whose
decoded pixels are 1.8 GB, although each class is read, quantised and dropped. The memory in
use stayed flat (glibc's mallinfo2: about 90 MB allocated over 60 classes); what grew was FREE memory
of glibc's main heap that never came back into use, about 40 MB per class: one set of the
class's large temporaries (its float32 latents and differences, 15 MB each at 300 images of
64 px RGB, and float64 copies, 29 MB). glibc raises its mmap threshold to the size of every
large block it frees from an mmap (up to 32 MB), so after the first class such temporaries are
carved from the heap instead of mmapped. Each class leaves small tensors behind (its result).
A small loop of torch ops over (300, 12288) floats that keeps a 10-element torch tensor per
iteration grows the same way, and stops growing when what it keeps is a numpy array. The
likely mechanism: torch allocates every CPU tensor with posix_memalign, which glibc before
2.38 serves by splitting a free block with some slack, so a small survivor placed in the hole
a temporary left makes it slightly too small for the next class's temporary of the same size;
each class takes fresh heap, and the old holes stay free and resident.

`release_free_memory` (glibc's malloc_trim) hands the free pages of those holes back to the
kernel between classes, once the resident set has grown by SLACK_MB, so it holds the results
and about one class's working set whatever the number of classes. One task's DDOQ loop on the
stress classes (benchmarks/class_loop_memory.py): 371-498 MB before every 10th of 200 classes,
peak 579 MB; before, 699 MB at class 10 and 2510 MB at class 60. It is no slower (14.8 s vs
17.1 s for 60 classes: fresh pages are faulted in either way). RDED's loop reuses its free heap
and grows far less (well under 1 MB a class); it is trimmed every few dozen classes, at no
measurable cost. What remains is address space: the holes stay mapped but not resident.
Pinning the mmap threshold (mallopt M_MMAP_THRESHOLD, 128 KB or 1 MB) removes the holes
themselves and was as flat, but it mmaps every temporary above the threshold, op by op: +5 %
time on that DDOQ loop, +40 % with the conv autoencoder, +30 % on RDED's crop scoring.

Off glibc (macOS, musl) it does nothing.
"""
from __future__ import annotations

import ctypes
import resource
import sys

__all__ = ["SLACK_MB", "peak_rss_mb", "release_free_memory", "rss_mb"]

SLACK_MB = 32.0
"""Growth of the resident set (MiB) that `release_free_memory` lets pass before it trims."""
_libc = None
_reference: float | None = None  # RSS (MiB) growth is measured from; None: the next reading


def _glibc():
    """The process's own C library when it is glibc, else False (looked up once)."""
    global _libc
    if _libc is None:
        _libc = False
        if sys.platform.startswith("linux"):
            try:
                lib = ctypes.CDLL(None)  # already loaded: no file is opened
                if hasattr(lib, "gnu_get_libc_version") and hasattr(lib, "malloc_trim"):
                    _libc = lib
            except OSError:
                pass
    return _libc


def release_free_memory(slack_mb: float = SLACK_MB) -> bool:
    """Between two classes of a per-class loop: return the heap's free pages to the kernel
    (glibc malloc_trim(0)) when the resident set has grown by more than `slack_mb` since the
    first call after the last trim. That reading holds what is in use plus one class's
    working set (which a loop that reuses its free heap faults in again after a trim), so a
    loop that leaves holes (DDOQ) is trimmed every class or two, and one that reuses its
    heap (RDED's crop scoring: +13 % time when trimmed every class) only when it has crept.
    Returns whether it trimmed; off glibc it does nothing."""
    global _reference
    lib = _glibc()
    if not lib:
        return False
    now = rss_mb()
    if _reference is None or now <= _reference + slack_mb:
        _reference = now if _reference is None else min(_reference, now)  # given back meanwhile: from here
        return False
    lib.malloc_trim(0)
    _reference = None  # the next reading, with the next class's working set back, is the reference
    return True


def rss_mb() -> float:
    """This process's resident set size now, in MiB (Linux /proc; elsewhere the peak)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mb()


def peak_rss_mb() -> float:
    """This process's peak resident set size, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux
