"""Where the backend listens, safe by default: without an auth pair only this machine can reach it.

Used by ``gunicorn.conf.py`` and ``freeal serve`` before anything is loaded, so it imports nothing heavy.
"""
from __future__ import annotations

import ipaddress
from collections.abc import Mapping

LOOPBACK_HOST = "127.0.0.1"
OPEN_HOST = "0.0.0.0"
ALLOW_NO_AUTH = "FREEAL_ALLOW_NO_AUTH"


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or name, as gunicorn's bind takes it) is reachable only from this machine."""
    host = host.strip().strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost, or a unix socket: treat as reachable from elsewhere


def serve_host(env: Mapping[str, str], host: str | None = None) -> str:
    """The address to bind: ``host`` (a ``--host`` flag), else ``HOST``, else 0.0.0.0 with an auth pair
    and 127.0.0.1 without one.

    Raises ``SystemExit`` with what to do where an address other machines can reach would serve without
    ``BASIC_AUTH_USER``/``BASIC_AUTH_PASS``, unless ``FREEAL_ALLOW_NO_AUTH`` says that is meant (a private
    network, a proxy in front that authenticates).
    """
    auth = bool(env.get("BASIC_AUTH_USER") and env.get("BASIC_AUTH_PASS"))
    chosen = host or env.get("HOST") or (OPEN_HOST if auth else LOOPBACK_HOST)
    if not auth and not is_loopback(chosen) and not _truthy(env.get(ALLOW_NO_AUTH)):
        raise SystemExit(
            f"error: refusing to listen on {chosen} without BASIC_AUTH_USER and BASIC_AUTH_PASS: anyone who can "
            "reach that address could start FreeAL jobs on your Label Studio projects and spend LLM calls. Set "
            "both (README, 'Security'; give Label Studio the pair in the model URL), or listen on 127.0.0.1 "
            f"(HOST=127.0.0.1), or set {ALLOW_NO_AUTH}=1 if something in front of the backend authenticates.")
    return chosen
