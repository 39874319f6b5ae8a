"""A worker's base URL, parsed once: where the legs connect, the Host header, the path prefix, TLS or not.

A leaf module: the registration schema validates worker URLs with :func:`parse_target`, and the leg client
connects with the result.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from pdmesh.router.errors import RouterError

_PATH_OK = re.compile(r"[A-Za-z0-9._~!$&'()*+,;=:@%/-]*")


class BadTarget(RouterError, ValueError):
    """A worker URL pdmesh cannot talk to."""


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    tls: bool
    netloc: bytes  # the Host header
    prefix: bytes  # path prefix, no trailing slash

    @property
    def key(self) -> tuple[str, int, bool]:
        return (self.host, self.port, self.tls)


def parse_target(base_url: str) -> Target:
    """Parse ``http[s]://host[:port][/prefix]``. Raises :class:`BadTarget` for anything else (credentials, query,
    fragment, a prefix that is not plain URL path characters, a bad port)."""
    try:
        u = urlsplit(base_url)
        port = u.port
    except ValueError as e:
        raise BadTarget(f"invalid worker URL {base_url!r}: {e}") from None
    prefix = u.path.rstrip("/")
    if (
        u.scheme not in ("http", "https")
        or not u.hostname
        or u.username is not None
        or u.password is not None
        or u.query
        or u.fragment
        or not _PATH_OK.fullmatch(prefix)
    ):
        raise BadTarget(
            f"unsupported worker URL {base_url!r} (http[s]://host[:port][/prefix], no credentials)"
        )
    tls = u.scheme == "https"
    port = port or (443 if tls else 80)
    host = u.hostname
    shown = f"[{host}]" if ":" in host else host
    netloc = shown if port == (443 if tls else 80) else f"{shown}:{port}"
    try:
        host_header = netloc.encode("ascii") if netloc.isascii() else netloc.encode("idna")
    except UnicodeError as e:
        raise BadTarget(f"invalid worker host in {base_url!r}: {e}") from None
    return Target(host=host, port=port, tls=tls, netloc=host_header, prefix=prefix.encode())
