"""Two network namespaces joined by a veth pair whose bandwidth `tc` limits: a slow network between two
"nodes" on one machine, so that communication can cost as much as compute and its time can be measured.

Addresses live only inside the namespaces this module creates (10.77.N.1 and .2); nothing else on the
machine can reach them, and they reach nothing else. Needs root (`ip netns`, `tc`); `available()` says
whether this machine allows it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess
from dataclasses import dataclass


@functools.cache  # asked at collection (skipif) and for the reason: one probe per session
def available() -> str | None:
    """None where namespaces can be made here, else why not (for pytest.skip): root, iproute2, and the
    right to make a namespace (a container may lack CAP_SYS_ADMIN or CAP_NET_ADMIN even as root)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not shutil.which("ip") or not shutil.which("tc"):
        return "iproute2 (ip, tc) is not installed"
    probe = f"ptprobe{os.getpid() % 100000}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None if made.returncode == 0 else f"cannot make a network namespace: {made.stderr.strip()}"


def _run(*command: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()}")


@dataclass(frozen=True)
class Link:
    namespaces: tuple[str, str]
    addresses: tuple[str, str]
    interfaces: tuple[str, str]
    megabits: float
    """The rate each direction is limited to."""

    def command(self, side: int, argv: list[str]) -> list[str]:
        """`argv` run inside namespace `side` (0 or 1), with gloo told which interface to use."""
        return ["ip", "netns", "exec", self.namespaces[side], "env",
                f"GLOO_SOCKET_IFNAME={self.interfaces[side]}", *argv]


@contextlib.contextmanager
def slow_link(megabits: float, tag: int = 0):
    """A Link of `megabits` per direction (a token bucket on each end), removed afterwards."""
    suffix = f"{os.getpid() % 10000}x{tag}"
    namespaces = (f"pt{suffix}a", f"pt{suffix}b")
    interfaces = (f"v{suffix}a", f"v{suffix}b")
    addresses = (f"10.77.{tag}.1", f"10.77.{tag}.2")
    try:
        for namespace in namespaces:
            _run("ip", "netns", "add", namespace)
        _run("ip", "link", "add", interfaces[0], "type", "veth", "peer", "name", interfaces[1])
        for namespace, interface, address in zip(namespaces, interfaces, addresses):
            _run("ip", "link", "set", interface, "netns", namespace)
            _run("ip", "-n", namespace, "addr", "add", f"{address}/24", "dev", interface)
            _run("ip", "-n", namespace, "link", "set", interface, "up")
            _run("ip", "-n", namespace, "link", "set", "lo", "up")
            # A token bucket: `megabits` sustained, a 256 kB burst, packets queued up to 50 ms.
            _run("ip", "netns", "exec", namespace, "tc", "qdisc", "add", "dev", interface, "root", "tbf",
                 "rate", f"{megabits}mbit", "burst", "256kb", "latency", "50ms")
        yield Link(namespaces, addresses, interfaces, megabits)
    finally:
        for namespace in namespaces:  # deleting a namespace removes its end of the veth pair, and so both
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
        subprocess.run(["ip", "link", "del", interfaces[0]], capture_output=True)  # if it never left this one
