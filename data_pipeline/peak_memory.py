"""Resident memory of this process (now, and its peak), not of the process that started it."""

from __future__ import annotations

import resource


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def resident_bytes() -> int | None:
    """The resident set now (Linux's VmRSS); None without /proc."""
    return _status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    """The most resident memory this process has held since it started (Linux's VmHWM).

    getrusage's ru_maxrss is the wrong figure for a program started from a larger one: Linux carries
    the parent's high-water mark across fork and exec, so a run started by a 2 GiB pytest process
    reports at least 2 GiB, whatever it used itself. VmHWM belongs to the address space exec created.
    """
    peak = _status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB
