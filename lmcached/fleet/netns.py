"""Several "hosts" on one machine: Linux network namespaces on one virtual switch, made and removed by the
multi-host tests and `lmcached bench remote`.

    with Hosts(["ctl", "redis", "b", "c"]) as hosts:
        hosts.ip("b")                 # 10.N.0.3
        hosts.prefix("b")             # ["ip", "netns", "exec", "lmc…-b"]: run a command on host b
        hosts.cut("redis")            # unplug a host's cable; hosts.plug("redis") puts it back

A switch namespace holds a bridge; every host is joined to it by a veth pair, and so is this (root) namespace,
at 10.N.0.254, so the test process reaches every host directly. Nothing leaves these namespaces and loopback.
Needs root (CAP_NET_ADMIN); `available()` says whether this machine allows it.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence


class NetnsUnavailable(RuntimeError):
    """This process may not create network namespaces (not root, or no `ip`)."""


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")
    return done


def available() -> str | None:
    """None when namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "multi-host tests need root (network namespaces)"
    probe = f"lmcprobe{os.getpid() % 100000}"
    done = _run("ip", "netns", "add", probe, check=False)
    if done.returncode != 0:
        return f"cannot create network namespaces: {done.stderr.strip()}"
    _run("ip", "netns", "del", probe, check=False)
    return None


class Hosts:
    """Named hosts (namespaces) on one 10.N.0.0/24 segment; removed again on exit, whatever happened."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        tag = os.getpid() % 10000
        self._tag = f"lmc{tag}"
        self.subnet = 100 + tag % 150  # 10.100.0.0/24 … 10.249.0.0/24: one per test process
        self._switch = f"{self._tag}sw"
        self._made: list[str] = []
        self._root_link = f"{self._tag}r"

    def ns(self, name: str) -> str:
        return f"{self._tag}-{name}"

    def ip(self, name: str) -> str:
        """The host's address (hosts are numbered from .2 in the order given)."""
        return f"10.{self.subnet}.0.{2 + self.names.index(name)}"

    @property
    def root_ip(self) -> str:
        return f"10.{self.subnet}.0.254"

    def prefix(self, name: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns(name)]

    def __enter__(self) -> Hosts:
        try:
            self._add_ns(self._switch)
            sw = ["ip", "netns", "exec", self._switch]
            _run(*sw, "ip", "link", "add", "br0", "type", "bridge")
            _run(*sw, "ip", "link", "set", "br0", "up")
            for i, name in enumerate(self.names):
                ns = self.ns(name)
                self._add_ns(ns)
                host_end, switch_end = f"{self._tag}h{i}", f"{self._tag}s{i}"
                _run("ip", "link", "add", host_end, "type", "veth", "peer", "name", switch_end)
                _run("ip", "link", "set", host_end, "netns", ns)
                _run("ip", "link", "set", switch_end, "netns", self._switch)
                _run(*sw, "ip", "link", "set", switch_end, "master", "br0")
                _run(*sw, "ip", "link", "set", switch_end, "up")
                inside = ["ip", "netns", "exec", ns]
                _run(*inside, "ip", "link", "set", host_end, "name", "eth0")
                _run(*inside, "ip", "addr", "add", f"{self.ip(name)}/24", "dev", "eth0")
                _run(*inside, "ip", "link", "set", "eth0", "up")
                _run(*inside, "ip", "link", "set", "lo", "up")
            switch_end = f"{self._tag}rs"
            _run("ip", "link", "add", self._root_link, "type", "veth", "peer", "name", switch_end)
            _run("ip", "link", "set", switch_end, "netns", self._switch)
            _run(*sw, "ip", "link", "set", switch_end, "master", "br0")
            _run(*sw, "ip", "link", "set", switch_end, "up")
            _run("ip", "addr", "add", f"{self.root_ip}/24", "dev", self._root_link)
            _run("ip", "link", "set", self._root_link, "up")
            return self
        except BaseException:
            self.__exit__()
            raise

    def _add_ns(self, ns: str) -> None:
        _run("ip", "netns", "del", ns, check=False)  # a leftover from a killed run
        _run("ip", "netns", "add", ns)
        self._made.append(ns)

    def _switch_port(self, name: str) -> str:
        return f"{self._tag}s{self.names.index(name)}"

    def cut(self, name: str) -> None:
        """Unplug the host: its packets go nowhere (peers see timeouts, not refusals), processes keep running."""
        _run("ip", "netns", "exec", self._switch, "ip", "link", "set", self._switch_port(name), "down")

    def plug(self, name: str) -> None:
        _run("ip", "netns", "exec", self._switch, "ip", "link", "set", self._switch_port(name), "up")

    def __exit__(self, *exc: object) -> None:
        _run("ip", "link", "del", self._root_link, check=False)
        for ns in reversed(self._made):  # deleting a namespace deletes its veth ends (and their peers)
            _run("ip", "netns", "del", ns, check=False)
        self._made.clear()
