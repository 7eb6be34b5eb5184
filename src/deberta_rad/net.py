"""Network helpers: the loopback check shared by the service (an API key off loopback) and the LLM teacher
(reports go only to an endpoint on this machine unless the user opts in), and a free loopback port for the
servers the platform, the tests and the benchmarks start; and the alert POST that drift monitoring and the
promotion gate send."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Mapping

import httpx


def is_loopback_host(host: str | None) -> bool:
    """True when ``host`` is this machine: `localhost` (any case, trailing dot allowed), 127.0.0.0/8 or
    ::1 (bare or in brackets, as a URL writes it)."""
    if not host:
        return False
    name = host.rstrip(".").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name.removeprefix("[").removesuffix("]")).is_loopback
    except ValueError:
        return False


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def post_alert(url: str, payload: Mapping, timeout_s: float = 10.0) -> str | None:
    """POST the alert as JSON; None when delivered, else why not."""
    try:
        response = httpx.post(url, json=dict(payload), timeout=timeout_s)
    except (httpx.HTTPError, httpx.InvalidURL) as error:
        return f"{url}: {type(error).__name__}: {error}"
    if response.status_code >= 400:
        return f"{url}: HTTP {response.status_code}"
    return None
