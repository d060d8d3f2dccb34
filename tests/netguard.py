"""Blocks and records every DNS lookup of, or connection to, a host that is not loopback.

Imported by conftest.py before torch, diffusers, transformers or aiohttp, so that no library holds an
unguarded ``getaddrinfo``. It sees Python-level sockets only; the browser tests block Chromium's traffic
themselves.
"""

import socket

ATTEMPTS: list[tuple[str, object]] = []
_LOCAL = {"localhost", "127.0.0.1", "::1", None, ""}


def _is_local(host) -> bool:
    return host in _LOCAL or str(host).startswith("127.")


_getaddrinfo = socket.getaddrinfo
_connect = socket.socket.connect


def _guarded_getaddrinfo(host, *args, **kwargs):
    if not _is_local(host):
        ATTEMPTS.append(("getaddrinfo", host))
        raise OSError(f"netguard: blocked lookup of {host!r}")
    return _getaddrinfo(host, *args, **kwargs)


def _guarded_connect(self, address):
    if isinstance(address, tuple) and not _is_local(address[0]):  # a str address is a Unix socket
        ATTEMPTS.append(("connect", address))
        raise OSError(f"netguard: blocked connect to {address!r}")
    return _connect(self, address)


socket.getaddrinfo = _guarded_getaddrinfo
socket.socket.connect = _guarded_connect
