"""Network addresses, for the servers' safe defaults (ground floor: standard library only)."""
from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach: localhost, 127.0.0.0/8, ::1. A wildcard ("0.0.0.0",
    "::"), another address or a host name other than localhost is reachable from elsewhere: False."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
