"""Network address checks shared by the service (an API key off loopback) and the LLM teacher (reports
go only to an endpoint on this machine unless the user opts in)."""

from __future__ import annotations

import ipaddress


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
