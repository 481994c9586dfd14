"""SSL for real: URLs with libpq's SSL parameters against a throwaway cluster that takes SSL connections only
(tests/system/pg_ssl.py), with certificates from a CA the test made.

Each test asks the server, in ``pg_stat_ssl``, whether its own connection is encrypted; the cluster refuses a
connection that is not, so a test that gets in without SSL cannot pass by accident.
"""

from __future__ import annotations

import os
import re
import ssl
from pathlib import Path

import pytest
from sqlalchemy import text
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_db_session import (
    Database,
    DatabaseSettings,
    DatabaseUnavailableError,
    DBSessionMiddleware,
    current_session,
    session_scope,
)
from asgi_db_session._ssl import SslFile, asyncpg_ssl, default_root_cert

from ..conftest import client
from .pg_ssl import CERT_ROLE, SslCluster, make_certificates, ssl_cluster

__all__ = ["ssl_cluster"]  # the session fixture, imported so that pytest finds it for this module

pytestmark = pytest.mark.anyio

OWN_SSL = "SELECT ssl, version, coalesce(client_dn, '') FROM pg_stat_ssl WHERE pid = pg_backend_pid()"


@pytest.fixture(autouse=True)
def no_libpq_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No CA certificate where libpq (and asyncpg) look when none is given: an empty home, no PGSSLROOTCERT."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("PGSSLROOTCERT", "PGSSLMODE", "PGSSLCERT", "PGSSLKEY"):
        monkeypatch.delenv(name, raising=False)
    for name in ("URL", "SSL", "SSL_ROOT_CERT"):
        monkeypatch.delenv(f"DATABASE_{name}", raising=False)


async def own_ssl(database: Database) -> tuple[bool, str, str]:
    """What pg_stat_ssl says about the connection a session of ``database`` gets."""
    async with session_scope(database.name) as session:
        row = (await session.execute(text(OWN_SSL))).one()
    return bool(row[0]), str(row[1]), str(row[2])


async def test_sslmode_require_as_providers_print_it_answers_requests(ssl_cluster: SslCluster) -> None:
    """``postgres://...?sslmode=require``, the form Heroku, Neon, Supabase and Render print: before, every request
    was a 500 (``connect() got an unexpected keyword argument 'sslmode'``)."""

    async def endpoint(request: Request) -> Response:
        row = (await current_session("provider").execute(text(OWN_SSL))).one()
        return PlainTextResponse(f"{row[0]} {row[1]}")

    app = Starlette(routes=[Route("/", endpoint)])
    app.add_middleware(DBSessionMiddleware, url=ssl_cluster.url("sslmode=require"), name="provider")
    async with client(app) as http:
        response = await http.get("/")
    assert response.status_code == 200
    assert re.fullmatch(r"True TLSv1\.[23]", response.text)


async def test_verify_full_with_the_ca_passes_and_is_encrypted(ssl_cluster: SslCluster) -> None:
    database = Database(ssl_cluster.url(f"sslmode=verify-full&sslrootcert={ssl_cluster.ca_cert}"), name="verify_full")
    try:
        await database.check(timeout=10)
        encrypted, version, _ = await own_ssl(database)
    finally:
        await database.dispose()
    assert encrypted
    assert version.startswith("TLSv1.")


async def test_the_settings_give_the_mode_and_the_ca(monkeypatch: pytest.MonkeyPatch, ssl_cluster: SslCluster) -> None:
    """DATABASE_SSL=verify-full and DATABASE_SSL_ROOT_CERT, with a URL that says nothing of SSL."""
    monkeypatch.setenv("DATABASE_URL", ssl_cluster.url())
    monkeypatch.setenv("DATABASE_SSL", "verify-full")
    monkeypatch.setenv("DATABASE_SSL_ROOT_CERT", str(ssl_cluster.ca_cert))
    database = Database(name="verify_full_settings")
    try:
        encrypted, _, _ = await own_ssl(database)
    finally:
        await database.dispose()
    assert encrypted


def test_verify_full_without_a_ca_fails_at_construction_saying_what_is_missing(ssl_cluster: SslCluster) -> None:
    with pytest.raises(ValueError, match="checks the server's certificate against a CA certificate") as caught:
        Database(ssl_cluster.url("sslmode=verify-full"), name="verify_full_no_ca")
    message = str(caught.value)
    assert "set DATABASE_SSL_ROOT_CERT=/path/to/ca.crt (or sslrootcert= in the URL" in message
    assert f"{Path.home()}/.postgresql/root.crt" in message


def test_a_ca_file_that_is_not_there_fails_at_construction(ssl_cluster: SslCluster, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.crt"
    with pytest.raises(ValueError, match=re.escape(f"The CA certificate file '{missing}' (sslrootcert)")) as caught:
        Database(ssl_cluster.url(f"sslmode=verify-full&sslrootcert={missing}"), name="verify_full_missing_ca")
    assert "No such file or directory" in str(caught.value)


async def test_verify_full_with_another_ca_is_refused(ssl_cluster: SslCluster) -> None:
    """A server certificate that the given CA did not sign: no connection, a 503-class error that says why."""
    url = ssl_cluster.url(f"sslmode=verify-full&sslrootcert={ssl_cluster.other_ca_cert}")
    database = Database(url, name="verify_full_other_ca")
    try:
        with pytest.raises(DatabaseUnavailableError, match="certificate verify failed"):
            await database.check(timeout=10)
    finally:
        await database.dispose()


async def test_verify_full_checks_the_host_name_and_verify_ca_does_not(ssl_cluster: SslCluster) -> None:
    """The server's certificate names IP:127.0.0.1 only; reached as localhost, verify-full refuses it."""
    query = f"sslrootcert={ssl_cluster.ca_cert}"
    full = Database(ssl_cluster.url(f"sslmode=verify-full&{query}", host="localhost"), name="full_localhost")
    ca_only = Database(ssl_cluster.url(f"sslmode=verify-ca&{query}", host="localhost"), name="ca_localhost")
    try:
        with pytest.raises(DatabaseUnavailableError, match="certificate verify failed: IP address mismatch|Hostname"):
            await full.check(timeout=10)
        encrypted, _, _ = await own_ssl(ca_only)
    finally:
        await full.dispose()
        await ca_only.dispose()
    assert encrypted


async def test_a_client_certificate_logs_in(ssl_cluster: SslCluster) -> None:
    """sslcert and sslkey: CERT_ROLE's pg_hba line is ``cert``, so without its certificate the login is refused."""
    query = f"sslmode=verify-full&sslrootcert={ssl_cluster.ca_cert}"
    files = f"&sslcert={ssl_cluster.client_cert}&sslkey={ssl_cluster.client_key}"
    with_cert = Database(ssl_cluster.url(query + files, user=CERT_ROLE), name="client_cert")
    without = Database(ssl_cluster.url(query, user=CERT_ROLE), name="no_client_cert")
    try:
        encrypted, _, client_dn = await own_ssl(with_cert)
        with pytest.raises(DatabaseUnavailableError, match="the server refused the login"):
            await without.check(timeout=10)
    finally:
        await with_cert.dispose()
        await without.dispose()
    assert encrypted
    assert client_dn == f"/CN={CERT_ROLE}"


async def test_sslmode_disable_is_refused_by_an_ssl_only_server(ssl_cluster: SslCluster) -> None:
    """The other side of every test here: without SSL this cluster lets nobody in."""
    database = Database(ssl_cluster.url("sslmode=disable"), name="plaintext")
    try:
        with pytest.raises(DatabaseUnavailableError) as caught:
            await database.check(timeout=10)
    finally:
        await database.dispose()
    assert "no pg_hba.conf entry" in str(caught.value)
    assert "no encryption" in str(caught.value)


def test_the_shown_url_says_what_is_in_force(ssl_cluster: SslCluster) -> None:
    settings = DatabaseSettings(url=ssl_cluster.url(f"sslmode=verify-full&sslrootcert={ssl_cluster.ca_cert}"))
    assert f"sslmode=verify-full&sslrootcert={ssl_cluster.ca_cert}" in settings.redacted_url


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CA, server and client files of pg_ssl.py, without a cluster: for what happens at construction."""
    directory = tmp_path_factory.mktemp("certificates")
    make_certificates(directory)
    return directory


def ssl_of(url: str, **settings: str) -> object:
    return DatabaseSettings(url=url, **settings).engine_options().get("connect_args", {}).get("ssl")  # type: ignore[arg-type]


HOST = "postgres://app@db.internal/shop"


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("sslmode=prefer&sslrootcert={ca}", "sslrootcert={ca} given, with sslmode=prefer: certificate files are"),
        ("sslcert={cert}&sslkey={key}", "sslcert={cert} and sslkey={key} given, with no SSL mode"),
        ("sslmode=require&sslkey={key}", "sslkey is given without sslcert"),
        ("sslmode=verify-ca&sslrootcert=system", "sslrootcert=system trusts every CA of the system"),
        ("sslmode=verify-full&sslcert={cert}&sslkey={key}", "checks the server's certificate against a CA"),
        ("sslmode=verify-full&sslrootcert={key}", "The CA certificate file '{key}' (sslrootcert) cannot be used: "),
        ("sslmode=require&sslcert={ca}&sslkey={key}", "The client certificate file '{ca}' (sslcert) cannot be used"),
    ],
)
def test_ssl_parameters_that_do_not_fit_together_are_an_error_at_construction(
    certificates: Path, query: str, message: str
) -> None:
    files = {"ca": certificates / "ca.crt", "cert": certificates / "client.crt", "key": certificates / "client.key"}
    with pytest.raises(ValueError, match=re.escape(message.format(**files))):
        DatabaseSettings(url=f"{HOST}?{query.format(**files)}")


def test_a_root_cert_setting_without_a_mode_is_an_error(certificates: Path) -> None:
    with pytest.raises(ValueError, match=re.escape(f"DATABASE_SSL_ROOT_CERT={certificates / 'ca.crt'} given, with")):
        DatabaseSettings(url=HOST, ssl_root_cert=str(certificates / "ca.crt"))


def test_sslrootcert_system_means_verify_full_on_the_systems_cas() -> None:
    for query in ("sslrootcert=system", "sslmode=verify-full&sslrootcert=system"):
        context = ssl_of(f"{HOST}?{query}")
        assert isinstance(context, ssl.SSLContext)
        assert context.check_hostname
        assert context.verify_mode == ssl.CERT_REQUIRED


def test_a_client_certificate_under_require_checks_the_server_as_libpq_would(
    certificates: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """require with sslcert: the server's certificate is checked only where libpq finds a CA file."""
    query = f"sslmode=require&sslcert={certificates / 'client.crt'}&sslkey={certificates / 'client.key'}"
    unchecked = ssl_of(f"{HOST}?{query}")
    assert isinstance(unchecked, ssl.SSLContext)
    assert unchecked.verify_mode == ssl.CERT_NONE
    monkeypatch.setenv("PGSSLROOTCERT", str(certificates / "ca.crt"))
    checked = ssl_of(f"{HOST}?{query}")
    assert isinstance(checked, ssl.SSLContext)
    assert (checked.verify_mode, checked.check_hostname) == (ssl.CERT_REQUIRED, False)


def test_verify_full_finds_libpqs_default_ca_files(certificates: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PGSSLROOTCERT or ~/.postgresql/root.crt: left to asyncpg, which reads them as libpq does."""
    monkeypatch.setenv("PGSSLROOTCERT", str(certificates / "ca.crt"))
    assert ssl_of(f"{HOST}?sslmode=verify-full") == "verify-full"
    monkeypatch.delenv("PGSSLROOTCERT")
    Path(default_root_cert()).parent.mkdir()
    Path(default_root_cert()).write_bytes((certificates / "ca.crt").read_bytes())
    assert ssl_of(f"{HOST}?sslmode=verify-full") == "verify-full"
    query = f"sslmode=verify-full&sslcert={certificates / 'client.crt'}&sslkey={certificates / 'client.key'}"
    context = ssl_of(f"{HOST}?{query}")
    assert isinstance(context, ssl.SSLContext)
    assert context.check_hostname


def test_without_ssl_parameters_asyncpg_keeps_its_default() -> None:
    assert ssl_of(HOST) is None
    assert asyncpg_ssl(None, "DATABASE_SSL", None, None, None) is None
    assert asyncpg_ssl("disable", "DATABASE_SSL", None, None, None) == "disable"
    with pytest.raises(ValueError, match="sslrootcert=x given, with DATABASE_SSL=allow"):
        asyncpg_ssl("allow", "DATABASE_SSL", SslFile("x", "sslrootcert"), None, None)


def test_the_default_ca_file_on_windows_is_under_appdata(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("APPDATA", str(tmp_path))
    with monkeypatch.context() as patched:
        patched.setattr(os, "name", "nt")
        found = default_root_cert()
    assert found == str(tmp_path / "postgresql" / "root.crt")
