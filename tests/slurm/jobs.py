"""Watching jobs on the test cluster: scontrol's view of a job, and waiting for a condition or its end."""

from __future__ import annotations

import subprocess
import time


def job(job_id: str) -> dict:
    """scontrol's view of the job: JobState, Reason, Restarts, ExitCode, ..."""
    text = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    return dict(field.split("=", 1) for field in text.split() if "=" in field)


def wait_for(condition, what: str, timeout: float = 300, interval: float = 0.5, cancelled=None):
    """The condition's first true value; AssertionError after `timeout`, RuntimeError once `cancelled` (a
    threading.Event) is set."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cancelled is not None and cancelled.is_set():
            raise RuntimeError(f"gave up waiting for {what}: the session is ending")
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_until_done(job_id: str, timeout: float = 400, cancelled=None) -> dict:
    return wait_for(lambda: (state := job(job_id)).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED",
                                                                       "TIMEOUT", "NODE_FAIL") and state,
                    f"job {job_id} to end", timeout, cancelled=cancelled)
