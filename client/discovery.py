"""Servers by name. A `--url` whose host is a DNS name (a Kubernetes headless Service, a round-robin record, a
Slurm job's node list in /etc/hosts) stands for every address it resolves to, and is resolved again while the job
runs: servers that join are used, servers that leave are dropped (their requests in flight fail over).

An IP address, or `localhost`, is one server as written. Pure standard library (the light client has no torch).
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Callable

from realfake.client.triton import normalise_url
from realfake.core.errors import UserError

# names that stand for this machine: one server, never expanded (localhost may resolve to 127.0.0.1 and ::1, where
# a server listening on one of them would look like two, one of them dead)
LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain"})


def split_url(url: str) -> tuple[str, int]:
    """(host, port) of a normalised HOST:PORT; an IPv6 host loses its brackets."""
    host, _, port = normalise_url(url).rpartition(":")
    return host.strip("[]"), int(port)


def is_name(host: str) -> bool:
    """True for a DNS name that may stand for many servers; False for an IP literal or this machine's name."""
    if host.lower() in LOCAL_NAMES:
        return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return True
    return False


def join(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def resolve(host: str, port: int) -> list[str] | None:
    """HOST's addresses as HOST:PORT strings, in the resolver's order without repeats; [] when the name does not
    exist (yet: a headless Service lists only ready pods); None when the resolver could not answer this time."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
            return []
        return None
    except OSError:
        return None
    seen: dict[str, None] = {}
    for _family, _type, _proto, _canon, sockaddr in infos:
        seen.setdefault(join(sockaddr[0], port), None)
    return list(seen)


class Fleet:
    """The servers a job's `--url`s stand for, now. `addresses()` resolves the names again on every call."""

    def __init__(self, urls: list[str]):
        self.urls = [normalise_url(u) for u in urls]
        self.names = [u for u in self.urls if is_name(split_url(u)[0])]
        self._last: dict[str, list[str]] = {}

    @property
    def dynamic(self) -> bool:
        """True when some --url is a name, so the fleet can change while the job runs."""
        return bool(self.names)

    def addresses(self) -> list[str]:
        """Every server now: the addresses of each name (its last answer when the resolver fails this time), and
        each address as given."""
        out: dict[str, None] = {}
        for url in self.urls:
            if url not in self.names:
                out.setdefault(url, None)
                continue
            found = resolve(*split_url(url))
            if found is None:
                found = self._last.get(url, [])
            self._last[url] = found
            for address in found:
                out.setdefault(address, None)
        return list(out)

    def wait(self, timeout: float, log: Callable[[str], None] = print, poll: float = 2.0) -> list[str]:
        """The first non-empty answer, waiting up to `timeout` seconds for names that resolve to nothing yet (a
        Service whose pods are still starting)."""
        deadline = time.monotonic() + timeout
        said = False
        while True:
            found = self.addresses()
            if found:
                return found
            if time.monotonic() >= deadline:
                raise UserError(
                    f"{', '.join(self.names)} resolved to no address for {timeout:.0f}s: is the Service (or DNS "
                    "record) there, and is any server behind it ready?"
                )
            if not said:
                log(f"waiting for {', '.join(self.names)} to resolve to a server (up to {timeout:.0f}s)")
                said = True
            time.sleep(poll)
