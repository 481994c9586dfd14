"""A throwaway PostgreSQL cluster that takes SSL connections only, with certificates from a CA the test makes.

Made like pg_cluster.py's (whose helpers this uses): pg_createcluster on a free port of 127.0.0.1, ``fsync =
off``, dropped at the end of the session; the shared server on 5432 is never touched. The certificates are
made with the ``openssl`` command (Debian's ``openssl`` package, which postgresql-common needs through
``ssl-cert``): a CA, the server's certificate signed by it for ``IP:127.0.0.1`` only (so that ``localhost`` is a
host name the certificate does not name), a client certificate for ``CERT_ROLE``, and a second CA that signed
nothing here. pg_hba.conf has ``hostssl`` lines only: a connection without SSL finds no line and is refused.
``CERT_ROLE`` logs in with its client certificate (``cert``); every other role with no password.

Without ``pg_createcluster`` or ``openssl`` the tests are skipped, with the reason shown; with ``CI`` set they
fail instead.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .pg_cluster import (
    DATABASE,
    SETTINGS,
    Cluster,
    _config,
    _create_configured,
    _create_database,
    _drop_cluster,
    _execute,
    _free_port,
    _installed_version,
    _run,
)

CERT_ROLE = "adbs_cert"
# SSL only: no plain "host" line, so that a connection that is not encrypted finds none and is refused.
SSL_HBA = f"""\
# Written by asgi_db_session's tests/system/pg_ssl.py: a throwaway cluster, reachable from this machine only.
local     all   all                          trust
hostssl   all   {CERT_ROLE}   127.0.0.1/32   cert
hostssl   all   all           127.0.0.1/32   trust
"""
SSL_SETTINGS = """
# Added by asgi_db_session's tests/system/pg_ssl.py.
ssl = on
ssl_cert_file = '{directory}/server.crt'
ssl_key_file = '{directory}/server.key'
ssl_ca_file = '{directory}/ca.crt'
"""
CA_EXTENSIONS = """\
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
"""
SERVER_EXTENSIONS = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""
CLIENT_EXTENSIONS = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""
DAYS = "2"


@dataclass(frozen=True)
class SslCluster:
    """The cluster, and the client's files: the CA that signed the server's certificate, one that did not, and
    ``CERT_ROLE``'s certificate and key."""

    cluster: Cluster
    ca_cert: Path
    other_ca_cert: Path
    client_cert: Path
    client_key: Path

    def url(self, query: str = "", *, user: str = "postgres", host: str = "127.0.0.1") -> str:
        """A ``postgres://`` URL, as a provider prints it, with ``query`` appended."""
        base = f"postgres://{user}@{host}:{self.cluster.port}/{DATABASE}"
        return f"{base}?{query}" if query else base


def _key(path: Path) -> None:
    _run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path)])


def _certificate(directory: Path, name: str, subject: str, extensions: str, issuer: str | None) -> None:
    """``name``.key and ``name``.crt in ``directory``: signed by ``issuer`` (its .crt and .key), or by itself."""
    _key(directory / f"{name}.key")
    (directory / f"{name}.ext").write_text(extensions)
    request = directory / f"{name}.csr"
    _run(["openssl", "req", "-new", "-key", str(directory / f"{name}.key"), "-subj", subject, "-out", str(request)])
    signer = (
        ["-signkey", str(directory / f"{name}.key")]
        if issuer is None
        else ["-CA", str(directory / f"{issuer}.crt"), "-CAkey", str(directory / f"{issuer}.key"), "-CAcreateserial"]
    )
    _run(
        [
            "openssl",
            "x509",
            "-req",
            "-in",
            str(request),
            *signer,
            "-days",
            DAYS,
            "-extfile",
            str(directory / f"{name}.ext"),
            "-out",
            str(directory / f"{name}.crt"),
        ]
    )


def make_certificates(directory: Path) -> None:
    """The CA, the server's and the client's certificates and keys, and a second CA, in ``directory``."""
    _certificate(directory, "ca", "/CN=asgi_db_session test CA", CA_EXTENSIONS, None)
    _certificate(directory, "other_ca", "/CN=asgi_db_session other test CA", CA_EXTENSIONS, None)
    _certificate(directory, "server", "/CN=127.0.0.1", SERVER_EXTENSIONS, "ca")
    _certificate(directory, "client", f"/CN={CERT_ROLE}", CLIENT_EXTENSIONS, "ca")


def _install_server_files(files: Path, config: Path) -> None:
    """The server's certificate, key and CA into the cluster's configuration directory, which its owner (the
    postgres user) reads; the key readable by that owner only, as the server insists."""
    owner = config.stat()
    for name in ("server.crt", "server.key", "ca.crt"):
        target = config / name
        shutil.copyfile(files / name, target)
        os.chown(target, owner.st_uid, owner.st_gid)
        target.chmod(0o600 if name.endswith(".key") else 0o644)


def _create_cert_role(cluster: Cluster) -> None:
    _execute(cluster.dsn, f"CREATE ROLE {CERT_ROLE} LOGIN")


@pytest.fixture(scope="session")
def ssl_cluster() -> Iterator[SslCluster]:
    """A running SSL-only cluster of this session's own, on a free port; dropped (stopped first) at the end."""
    missing = [tool for tool in ("pg_createcluster", "openssl") if shutil.which(tool) is None]
    if missing:
        reason = f"{' and '.join(missing)} not installed, so no throwaway SSL cluster"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI is set, so the SSL tests must run: apt-get install postgresql-common openssl")
        pytest.skip(reason)
    cluster = Cluster(_installed_version(), f"adbs_ssl_{os.getpid()}", _free_port())
    config = _config(cluster)
    with tempfile.TemporaryDirectory(prefix="adbs-ssl-") as name:
        files = Path(name)
        try:
            make_certificates(files)
            _create_configured(cluster, SSL_HBA, SETTINGS + SSL_SETTINGS.format(directory=config))
            _install_server_files(files, config)
            _run(cluster.ctl("start"))
            _create_database(cluster)
            _create_cert_role(cluster)
            names = ("ca.crt", "other_ca.crt", "client.crt", "client.key")
            yield SslCluster(cluster, *(files / name for name in names))
        finally:
            _drop_cluster(cluster, config)
