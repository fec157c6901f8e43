"""Network namespaces as stand-in hosts: each with its own address, port space and loopback, reached
from this machine over a veth pair, so a test can run several servers that look like separate machines
(every one on Triton's default ports) and kill one without touching the others.

    with StandInHosts(3) as hosts:
        hosts[0].address            # e.g. 10.231.0.2, reachable from here
        hosts[0].command([...])     # the command, run inside that host's namespace

Needs root (CAP_NET_ADMIN) and iproute2's `ip`; `unavailable_reason()` says why not where they are missing.
Everything created is removed on exit, and names carry this process's id so parallel runs do not collide.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
from dataclasses import dataclass

from osnet_base.errors import OsnetTritonError
from osnet_base.triton_server import TritonInstall

logger = logging.getLogger(__name__)

# A private /16 for the veth pairs: host i is 10.231.i.2, its peer on this side 10.231.i.1.
SUBNET_PREFIX = "10.231"


class NamespaceError(OsnetTritonError):
    """A namespace or veth pair could not be created."""


def _ip(*arguments: str) -> None:
    result = subprocess.run(["ip", *arguments], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise NamespaceError(f"ip {' '.join(arguments)} failed: {result.stderr.strip()}")


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here, or None when they can (tried for real, then removed)."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed (apt-get install iproute2)"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = f"osnet-probe-{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except NamespaceError as exc:
        return str(exc)
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)
    return None


@dataclass(frozen=True)
class StandInHost:
    namespace: str
    address: str  # this host's address, reachable from the machine's own namespace

    def command(self, command: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespace, *command]


@dataclass(frozen=True)
class NamespacedInstall(TritonInstall):
    """A tritonserver that runs inside a stand-in host."""

    namespace: str = ""

    def command(self, flags: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespace, *super().command(flags)]


class StandInHosts:
    """`count` namespaces, each with a veth pair to this one and its loopback up."""

    def __init__(self, count: int):
        if not 1 <= count <= 200:
            raise ValueError(f"count must be 1..200, got {count}")
        self.count = count
        self.hosts: list[StandInHost] = []
        self._tag = f"{os.getpid() % 100000}"

    def __enter__(self) -> list[StandInHost]:
        try:
            for index in range(self.count):
                self.hosts.append(self._create(index))
        except BaseException:
            self.remove()
            raise
        return self.hosts

    def _create(self, index: int) -> StandInHost:
        namespace = f"osnet-{self._tag}-{index}"
        outside, inside = f"on{self._tag}h{index}", f"on{self._tag}n{index}"  # interface names: 15 chars at most
        _ip("netns", "add", namespace)
        host = StandInHost(namespace=namespace, address=f"{SUBNET_PREFIX}.{index}.2")
        try:
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside, "netns", namespace)
            _ip("addr", "add", f"{SUBNET_PREFIX}.{index}.1/24", "dev", outside)
            _ip("link", "set", outside, "up")
            _ip("-n", namespace, "addr", "add", f"{host.address}/24", "dev", inside)
            _ip("-n", namespace, "link", "set", inside, "up")
            _ip("-n", namespace, "link", "set", "lo", "up")
        except BaseException:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=30)
            raise
        logger.info("stand-in host %s at %s", namespace, host.address)
        return host

    def remove(self) -> None:
        # Deleting a namespace deletes the veth inside it, and with it its peer out here.
        for host in self.hosts:
            subprocess.run(["ip", "netns", "del", host.namespace], capture_output=True, timeout=30)
        self.hosts = []

    def __exit__(self, *exc_info: object) -> None:
        self.remove()
