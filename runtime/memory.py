"""Linux memory tuning for a loaded pipeline: the C heap's freed pages given back, memory-mapped
weights read on demand, and the load's memory moved to huge pages between answers. Best effort
everywhere: on another system nothing changes."""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import threading
from pathlib import Path
from typing import Iterable


def return_freed_memory() -> None:
    """Give the C heap's freed pages back to the system. glibc keeps them otherwise: parsing the
    generator's tokenizer left 16 MB freed but resident, on top of which the generator then loaded."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass  # not glibc: its allocator decides


MADV_RANDOM = 1  # Linux's mman.h


@functools.cache
def _libc_madvise():
    madvise_call = ctypes.CDLL(None, use_errno=True).madvise
    madvise_call.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise_call


def madvise(start: int, end: int, advice: int) -> bool:
    """madvise(2) on [start, end) through the C library; False where it failed or there is none."""
    try:
        return _libc_madvise()(start, end - start, advice) == 0
    except (OSError, AttributeError, TypeError):
        return False


def read_weights_on_demand(paths: Iterable[Path]) -> None:
    """Keep resident only the pages of memory-mapped weights that answers read.

    onnxruntime maps a graph's weights file; the weights it prepacks are copied out at load and their
    pages let go, but the embedding tables stay mapped and are read a row per token. Linux kept far
    more of them than those rows: the checksum pass had left the whole file in the page cache (in
    large folios, which a mapping takes whole), and each fault reads and maps the pages around it.
    Dropping the file's cached pages and marking its mappings random-access took the compressed demo
    bundle's resident memory after 31 answers from 300 to 272 MB (docs/bundle.md, "Memory and start-up"). The
    price: a row's first read comes from the disk (prefill about 2 ms slower over those answers here).
    Best effort: on another system the kernel decides."""
    paths = {str(Path(p).resolve()) for p in paths}
    for path in paths:
        try:
            descriptor = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)  # mapped pages stay
            finally:
                os.close(descriptor)
        except AttributeError:  # no posix_fadvise on this system
            break
        except OSError:
            continue
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].rstrip("\n") in paths:
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    madvise(start, end, MADV_RANDOM)
    except OSError:
        pass


MADV_COLLAPSE = 25  # Linux 6.1+
HUGE_PAGE = 2 << 20
FULLY_RESIDENT = 0.9  # the share of a mapping resident for collapse_when_idle to take it


def anonymous_regions(resident: bool = False) -> dict[tuple[int, int], int]:
    """{(start, end): resident bytes} of this process's writable anonymous mappings (Linux). The
    resident bytes come from /proc/self/smaps, which takes tens of milliseconds to read; without
    `resident`, the mappings alone come from /proc/self/maps (under a millisecond) and count 0."""
    regions, current = {}, None
    try:
        with open("/proc/self/smaps" if resident else "/proc/self/maps") as lines:
            for line in lines:
                fields = line.split(maxsplit=5)
                if len(fields) >= 5 and "-" in fields[0] and ":" in fields[3]:
                    anonymous = (len(fields) == 5 or fields[5].strip() == "[heap]") and fields[1].startswith("rw")
                    current = tuple(int(x, 16) for x in fields[0].split("-")) if anonymous else None
                    if current:
                        regions[current] = 0
                elif current and line.startswith("Rss:"):
                    regions[current] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return regions


def huge_page_blocks(low: int, high: int) -> range:
    """The starts of the whole 2 MB pages inside [low, high)."""
    return range(-(-low // HUGE_PAGE) * HUGE_PAGE, high // HUGE_PAGE * HUGE_PAGE, HUGE_PAGE)


class AnswersInFlight:
    """Counts the answers being generated: `idle` is set while there are none, `answered` once one
    has ended. Entered around each generation."""

    def __init__(self):
        self._count = 0
        self._lock = threading.Lock()
        self.idle = threading.Event()
        self.idle.set()
        self.answered = threading.Event()

    def __enter__(self):
        with self._lock:
            self._count += 1
            self.idle.clear()

    def __exit__(self, *exc):
        with self._lock:
            self._count -= 1
            if self._count == 0:
                self.idle.set()
        self.answered.set()


def huge_pages_allowed() -> bool:
    """Whether this system lets processes use transparent huge pages (Linux; "never" says no)."""
    try:
        return "[never]" not in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


def collapse_when_idle(before: Iterable[tuple[int, int]], answers: AnswersInFlight, first_wait_s: float) -> None:
    """collapse_into_huge_pages on the anonymous mappings made since `before` (the load's), 2 MB at a
    time, only while no answer is being generated: collapsing holds the process's memory map for
    each page it copies, which stalls an answer's page faults (beside the first answer it took
    0.15 -> 0.45 s). Waits for the first answer to end, or `first_wait_s` without one, and runs at
    the lowest nice level."""
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # this thread only, on Linux
        except (AttributeError, OSError):
            pass
    answers.answered.wait(first_wait_s)
    before = set(before)
    for (low, high), resident in anonymous_regions(resident=True).items():
        if (low, high) in before or resident < FULLY_RESIDENT * (high - low):
            continue
        for block in huge_page_blocks(low, high):
            answers.idle.wait()
            collapse_into_huge_pages([(block, block + HUGE_PAGE)])


def collapse_into_huge_pages(regions: Iterable[tuple[int, int]]) -> int:
    """Back the given anonymous mappings with 2 MB pages; returns the bytes collapsed.

    Decoding streams every weight once per token, and onnxruntime's prepacked weights (most of a
    loaded pipeline) sit in anonymous memory. On 4 KB pages that is a TLB miss every 4 KB; the
    kernel gives huge pages at allocation time only when one is free, which on a machine that has
    run a while it often is not. Collapsing copies the pages into huge ones: 0.3 s for the demo
    bundle's 140 MB, so Pipeline.load has it done in a background thread between answers
    (collapse_when_idle). Decode went from about 7.4 to 6.4 ms/token (docs/bundle.md, "Memory and
    start-up"). It is given only mappings at least FULLY_RESIDENT resident (onnxruntime's prepacked
    weights are; the kernel fills the rest of each 2 MB it collapses): resident memory measured the
    same with and without it.
    Best effort: without MADV_COLLAPSE (Linux before 6.1) nothing changes."""
    collapsed = 0
    for low, high in regions:
        blocks = huge_page_blocks(low, high)
        if blocks and madvise(blocks[0], blocks[-1] + HUGE_PAGE, MADV_COLLAPSE):
            collapsed += len(blocks) * HUGE_PAGE
    return collapsed

