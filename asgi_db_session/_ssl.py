"""libpq's SSL parameters (sslmode, sslrootcert, sslcert, sslkey) as the one ``ssl`` argument asyncpg takes.

asyncpg's ``connect()`` takes ``ssl=``: a libpq mode string, or an ``ssl.SSLContext``. It reads ``sslrootcert``,
``sslcert`` and ``sslkey`` from a DSN only, never as keywords, which is how SQLAlchemy passes a URL's query.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable
from typing import NamedTuple, TypeVar

from .exceptions import (
    SSL_FILE_UNREADABLE,
    SSL_FILE_WITHOUT_MODE,
    SSL_KEY_WITHOUT_CERT,
    SSL_NO_ROOT_CERT,
    SSL_SYSTEM_NEEDS_VERIFY_FULL,
)

VERIFYING_MODES = ("verify-ca", "verify-full")
ENCRYPTING_MODES = ("require", *VERIFYING_MODES)
# libpq's sslrootcert=system (PostgreSQL 16): the system's trusted CAs, as for a managed service's public cert.
SYSTEM_ROOT_CERT = "system"

_T = TypeVar("_T")


class SslFile(NamedTuple):
    """A certificate or key file, and where it was given (for messages): ``DATABASE_SSL_ROOT_CERT``, say."""

    path: str
    source: str


def default_root_cert() -> str:
    """Where libpq (and asyncpg) look for the CA certificate when none is given and PGSSLROOTCERT is unset."""
    if os.name == "nt":
        return os.path.join(os.environ.get("APPDATA", ""), "postgresql", "root.crt")
    return os.path.join(os.path.expanduser("~"), ".postgresql", "root.crt")


def asyncpg_ssl(
    mode: str | None, mode_source: str, root_cert: SslFile | None, cert: SslFile | None, key: SslFile | None
) -> str | ssl.SSLContext | None:
    """The ``ssl`` argument for ``asyncpg.connect()``, or None to leave asyncpg's default (libpq's ``prefer``).

    A mode without files stays a string, which asyncpg reads as libpq does (``require`` checks the server's
    certificate when ``~/.postgresql/root.crt`` exists). With files, an SSLContext made here, so that a missing
    or unreadable file is an error now rather than at every connect. ValueError, saying what is missing, when
    the parameters do not fit together: a certificate file under a mode that does not use it (libpq would ignore
    it silently), or a verifying mode with no CA certificate anywhere libpq would look.
    """
    if mode is None and root_cert is not None and root_cert.path == SYSTEM_ROOT_CERT:
        mode = "verify-full"  # libpq's default for sslrootcert=system
    given = [file for file in (root_cert, cert, key) if file is not None]
    if mode not in ENCRYPTING_MODES:
        if given:
            files = " and ".join(f"{file.source}={file.path}" for file in given)
            shown = "no SSL mode" if mode is None else f"{mode_source}={mode}"
            raise ValueError(SSL_FILE_WITHOUT_MODE.format(files=files, mode=shown))
        return mode
    if key is not None and cert is None:
        raise ValueError(SSL_KEY_WITHOUT_CERT)
    if root_cert is None:
        root_cert = _libpq_default_root_cert()
        if root_cert is None and mode in VERIFYING_MODES:
            raise ValueError(SSL_NO_ROOT_CERT.format(mode=mode, default=default_root_cert()))
        if cert is None:
            return mode  # asyncpg reads that same default CA file (and its CRL) as libpq does
    return _context(mode, root_cert, cert, key)


def _libpq_default_root_cert() -> SslFile | None:
    """The CA file libpq uses when none is given: PGSSLROOTCERT, else ~/.postgresql/root.crt where it exists."""
    env = os.environ.get("PGSSLROOTCERT")
    if env:
        return SslFile(env, "PGSSLROOTCERT")
    default = default_root_cert()
    return SslFile(default, "libpq's default") if os.path.isfile(default) else None


def _context(mode: str, root_cert: SslFile | None, cert: SslFile | None, key: SslFile | None) -> ssl.SSLContext:
    if root_cert is not None and root_cert.path == SYSTEM_ROOT_CERT:
        if mode != "verify-full":
            raise ValueError(SSL_SYSTEM_NEEDS_VERIFY_FULL.format(mode=mode))
        context = ssl.create_default_context()
    elif root_cert is not None:
        context = _load(root_cert, "CA certificate", lambda path: ssl.create_default_context(cafile=path))
        # verify-ca, and require with a CA file (as libpq does): the chain is checked, the host name is not.
        context.check_hostname = mode == "verify-full"
    else:  # require, with a client certificate and no CA file: encrypted, the server's certificate unchecked
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if cert is not None:
        key_path = None if key is None else key.path
        _load(cert, "client certificate", lambda path: context.load_cert_chain(path, key_path))
    return context


def _load(file: SslFile, what: str, load: Callable[[str], _T]) -> _T:
    try:
        return load(file.path)
    except OSError as exc:  # ssl.SSLError is one too: not PEM, or a key that does not match its certificate
        reason = str(exc) if isinstance(exc, ssl.SSLError) or not exc.strerror else exc.strerror
        raise ValueError(
            SSL_FILE_UNREADABLE.format(what=what, path=file.path, source=file.source, reason=reason)
        ) from None
