"""A cheap check before an attack spends anything: can the victim's endpoint be reached?

`check_endpoint` opens (and closes) one TCP connection to the endpoint's host and port, or to
the HTTP proxy that requests would use, with a short timeout. It sends no request: the
victim's predict is never called, so nothing is charged and nothing is logged by the victim.
A run against a server that is down then stops in seconds, before any generation, training
or ledger write, instead of failing after minutes of work.
"""

from __future__ import annotations

import socket
import urllib.request
from urllib.parse import urlsplit

from aspkd_ray.errors import UserError

DEFAULT_TIMEOUT_S = 5.0
DEFAULT_PORTS = {"http": 80, "https": 443}


class VictimUnreachable(UserError):
    """The victim's endpoint does not accept connections (server down, wrong host or port,
    firewall). Nothing was sent to it and nothing was charged."""


def _address(url: str) -> tuple[str, str, int]:
    """(URL without credentials, host, port) of `url`; raises VictimUnreachable when the URL
    cannot be reached by HTTP at all."""
    from aspkd_ray.teacher.http_victim import safe_url

    parts = urlsplit(url)
    shown = safe_url(url) if parts.scheme else url
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        raise VictimUnreachable(f"victim.endpoint: got {shown!r}; expected an http:// or "
                                f"https:// URL with a host, e.g. http://127.0.0.1:5000.")
    try:
        port = parts.port or DEFAULT_PORTS[parts.scheme]
    except ValueError:  # a port that is not a number or out of range
        raise VictimUnreachable(f"victim.endpoint: got {shown!r}; its port is not a number "
                                f"in 1..65535.") from None
    return shown, parts.hostname, port


def _via_proxy(scheme: str, host: str) -> tuple[str, int] | None:
    """The HTTP proxy that requests would use for `host` (HTTP(S)_PROXY, NO_PROXY), if any."""
    proxy = urllib.request.getproxies().get(scheme)
    if not proxy or urllib.request.proxy_bypass(host):
        return None
    parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    if not parts.hostname:
        return None
    try:
        return parts.hostname, parts.port or DEFAULT_PORTS.get(parts.scheme, 80)
    except ValueError:
        return None


def check_endpoint(url: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Raise VictimUnreachable unless a TCP connection to the endpoint opens in `timeout_s`.

    Only connects and closes; never sends a request (see the module docstring).
    """
    shown, host, port = _address(url)
    target, what = (host, port), f"{host}:{port}"
    proxy = _via_proxy(urlsplit(url).scheme, host)
    if proxy is not None:
        target, what = proxy, f"the HTTP proxy {proxy[0]}:{proxy[1]} (for {host}:{port})"
    try:
        with socket.create_connection(target, timeout=timeout_s):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        if isinstance(exc, socket.gaierror):
            reason = f"unknown host ({exc.strerror})"
        elif isinstance(exc, TimeoutError):
            reason = f"no answer within {timeout_s:g} s"
        raise VictimUnreachable(
            f"victim.endpoint {shown}: cannot connect to {what}: {reason}. Start the victim "
            f"server (e.g. `aspkd serve-victim`) or fix victim.endpoint; nothing was sent "
            f"and nothing was charged.") from None
