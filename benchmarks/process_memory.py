"""What Linux's /proc says about a process's memory, in MB: its resident set now, its peak, and the
other fields of /proc/PID/status (or of a file of the same form, such as smaps_rollup).

One reader for every measurement here: the bench's worker (its own process), the hnswlib sweep, the
reliability suite's soak (a server's process) and the gradient-KD probe.
"""

from __future__ import annotations

import resource
from pathlib import Path


def status_mb(field: str, source: str = "status", pid: int | str = "self") -> float | None:
    """A memory field of /proc/PID/status (VmRSS, VmHWM, RssAnon, RssFile), or of another /proc/PID
    file of the same form (`source="smaps_rollup"`: AnonHugePages), in MB; None where there is none.
    PID is this process unless given."""
    try:
        for line in Path(f"/proc/{pid}/{source}").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """This process's high-water RSS. VmHWM, because ru_maxrss survives fork+exec on Linux and would
    report the (larger) parent's peak for a small child."""
    peak = status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rss_mb(pid: int | str = "self") -> float:
    """A process's resident memory now (this one unless `pid` is given); NaN where /proc does not say
    (not Linux, or the process has exited)."""
    rss = status_mb("VmRSS", pid=pid)
    return rss if rss is not None else float("nan")
