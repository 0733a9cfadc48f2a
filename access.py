"""Who may connect: the rules shared by the data server (flight_server.py) and the metrics
server (live_metrics.py). Standard library only, so either runs without torch.

Anything bound beyond loopback must require a token; tokens live in files (never on a command
line, where `ps` shows them) and are compared in constant time.
"""
from __future__ import annotations

import hmac
import ipaddress
from pathlib import Path


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_token_beyond_loopback(host: str, token: str | None, what: str, flag: str) -> None:
    """Refuse to expose `what` on a non-loopback address without a token."""
    if token is None and not is_loopback(host):
        raise ValueError(f"binding {host} exposes {what}: give a bearer token ({flag}); "
                         "anything beyond loopback needs a token")


def read_token(path: str | Path) -> str:
    token = Path(path).read_text().strip()
    if not token:
        raise ValueError(f"{path}: empty token file")
    return token


def token_matches(presented: str | bytes, expected: str | bytes) -> bool:
    """Constant-time comparison: the time taken says nothing about how much of a guess was right."""
    as_bytes = [value.encode() if isinstance(value, str) else value for value in (presented, expected)]
    return hmac.compare_digest(*as_bytes)
