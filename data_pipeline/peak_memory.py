"""Peak resident memory of this process, not of the process that started it."""

from __future__ import annotations

import resource


def peak_rss_bytes() -> int:
    """The most resident memory this process has held since it started (Linux's VmHWM).

    getrusage's ru_maxrss is the wrong figure for a program started from a larger one: Linux carries
    the parent's high-water mark across fork and exec, so a run started by a 2 GiB pytest process
    reports at least 2 GiB, whatever it used itself. VmHWM belongs to the address space exec created.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # no /proc: kilobytes on Linux
