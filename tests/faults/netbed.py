"""A multi-host test bed on one kernel: network namespaces ("hosts") on a bridge, with fault injection.

The test process stays in the root namespace at 10.99.0.1 on bridge ``mlbr0``;
host ``i`` (1-based) is namespace ``ml-h<i>`` with ``eth0`` at 10.99.0.<i+1>,
joined to the bridge by a veth pair whose root end is ``mlv<i>``.  Faults act on
one host's link, in both directions: ``tc netem`` (delay, jitter, loss,
reorder) on both ends of its veth, and link down/up.  Nothing leaves these
namespaces; :meth:`NetBed.close` removes every device and namespace it made.
"""

from __future__ import annotations

import shutil
import subprocess

BRIDGE = "mlbr0"
NET = "10.99.0"


def sh(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")


def why_not() -> str:
    """Why a bed cannot be built here ('' when it can): needs root, ip, tc and netem."""
    import os

    if os.geteuid() != 0:
        return "needs root for network namespaces"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"{tool} (iproute2) is not installed"
    probe = subprocess.run(["ip", "link", "add", "mlprobe0", "type", "veth", "peer", "name", "mlprobe1"],
                           capture_output=True, text=True)
    if probe.returncode:
        return f"cannot create network devices: {probe.stderr.strip()}"
    try:
        netem = subprocess.run(["tc", "qdisc", "add", "dev", "mlprobe0", "root", "netem", "delay", "1ms"],
                               capture_output=True, text=True)
        if netem.returncode:
            return f"tc netem unavailable in this kernel ({netem.stderr.strip()}); tests/lab.sh has it"
    finally:
        subprocess.run(["ip", "link", "del", "mlprobe0"], capture_output=True)
    return ""


class NetBed:
    def __init__(self, hosts: int) -> None:
        self.hosts = hosts
        self._made: list[str] = []
        try:
            sh("ip", "link", "add", BRIDGE, "type", "bridge")
            self._made.append(f"link:{BRIDGE}")
            sh("ip", "addr", "add", f"{NET}.1/24", "dev", BRIDGE)
            sh("ip", "link", "set", BRIDGE, "up")
            for i in range(1, hosts + 1):
                ns, veth = self.ns(i), f"mlv{i}"
                sh("ip", "netns", "add", ns)
                self._made.append(f"ns:{ns}")
                sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
                self._made.append(f"link:{veth}")
                sh("ip", "link", "set", veth, "master", BRIDGE, "up")
                sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{self.ip(i)}/24", "dev", "eth0")
                sh("ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "up")
                sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    @staticmethod
    def ns(i: int) -> str:
        return f"ml-h{i}"

    @staticmethod
    def ip(i: int) -> str:
        """Host ``i``'s address; 0 is the test process in the root namespace."""
        return f"{NET}.{i + 1}"

    def prefix(self, i: int) -> list[str]:
        """argv prefix that runs a command on host ``i``."""
        return ["ip", "netns", "exec", self.ns(i)]

    def netem(self, i: int, *spec: str) -> None:
        """Apply ``tc netem`` ``spec`` (e.g. "delay", "10ms", "10ms", "loss", "5%") to host ``i``'s link both ways."""
        sh("tc", "qdisc", "replace", "dev", f"mlv{i}", "root", "netem", *spec)
        sh(*self.prefix(i), "tc", "qdisc", "replace", "dev", "eth0", "root", "netem", *spec)

    def clear(self, i: int) -> None:
        subprocess.run(["tc", "qdisc", "del", "dev", f"mlv{i}", "root"], capture_output=True)
        subprocess.run([*self.prefix(i), "tc", "qdisc", "del", "dev", "eth0", "root"], capture_output=True)

    def link(self, i: int, up: bool) -> None:
        """Cut (``up=False``) or restore host ``i``'s link; sockets on it stall as on a pulled cable."""
        sh("ip", "link", "set", f"mlv{i}", "up" if up else "down")

    def close(self) -> None:
        for item in reversed(self._made):
            kind, name = item.split(":", 1)
            argv = ["ip", "link", "del", name] if kind == "link" else ["ip", "netns", "del", name]
            subprocess.run(argv, capture_output=True)
        self._made.clear()
