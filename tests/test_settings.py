"""DatabaseSettings: environment variables, driver choice, engine options, and no password anywhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from asgi_db_session import Database, DatabaseSettings
from asgi_db_session._urls import redact_url, to_async_url

from .conftest import DEFAULT_BOUNDS

PASSWORD = "Zx9-q7Wv@Pw"  # no dictionary words (SecretStr's repr says "Secret"), and a raw "@"
PIECES = {PASSWORD[i : i + 4] for i in range(len(PASSWORD) - 3)}


def assert_no_password(text: str) -> None:
    leaked = sorted(piece for piece in PIECES if piece in text)
    assert not leaked, f"password pieces {leaked} in {text!r}"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("URL", "POOL_SIZE", "MAX_OVERFLOW", "ECHO", "POOL_PRE_PING", "APPLICATION_NAME", "SSL", "PGBOUNCER"):
        monkeypatch.delenv(f"DATABASE_{name}", raising=False)


def test_fields_come_from_database_prefixed_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://app@db.internal:5432/shop")
    monkeypatch.setenv("DATABASE_POOL_SIZE", "7")
    monkeypatch.setenv("DATABASE_POOL_PRE_PING", "false")
    settings = DatabaseSettings()
    assert settings.url == "postgresql+asyncpg://app@db.internal:5432/shop"
    assert settings.pool_size == 7
    assert settings.pool_pre_ping is False


def test_defaults_match_the_design() -> None:
    settings = DatabaseSettings()
    assert settings.url is None
    assert (settings.pool_size, settings.max_overflow, settings.pool_timeout) == (5, 10, 10.0)
    assert (settings.pool_pre_ping, settings.pool_recycle, settings.echo) == (True, -1, False)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgresql://u@h/d", "postgresql+asyncpg://u@h/d"),
        ("postgres://u@h/d", "postgresql+asyncpg://u@h/d"),
        ("postgresql+asyncpg://u@h/d", "postgresql+asyncpg://u@h/d"),
        ("sqlite:///./app.db", "sqlite+aiosqlite:///./app.db"),
        ("sqlite://", "sqlite+aiosqlite://"),
    ],
)
def test_a_url_without_an_async_driver_gets_one(given: str, expected: str) -> None:
    assert DatabaseSettings(url=given).url == expected


@pytest.mark.parametrize(
    ("given", "advice"),
    [
        ("postgresql+psycopg2://u:p@h/d", "write postgresql+asyncpg://"),
        ("mysql+pymysql://u:p@h/d", "write mysql+aiomysql://"),
        ("sqlite+pysqlite:///x.db", "write sqlite+aiosqlite://"),
    ],
)
def test_a_sync_driver_is_an_error_that_says_what_to_write(given: str, advice: str) -> None:
    with pytest.raises(ValueError, match="is a synchronous driver") as caught:
        to_async_url(given)
    assert advice in str(caught.value)
    with pytest.raises(ValidationError, match=re.escape(advice)):
        DatabaseSettings(url=given)


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("not a url", "The database URL cannot be parsed (its text is not shown"),
        ("postgresql+nodriver://u@h/d", "Unknown database driver 'postgresql+nodriver'"),
        ("oracle://u@h/d", "No async driver is known for 'oracle'"),
    ],
)
def test_other_bad_urls_are_explained(given: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        to_async_url(given)


def test_a_raw_at_sign_in_the_password_is_kept_whole() -> None:
    url = to_async_url(f"postgresql://app:{PASSWORD}@db.internal/shop")
    assert url.password == PASSWORD
    assert url.host == "db.internal"


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://app:{PASSWORD}@db.internal/shop",
        f"postgresql+psycopg2://app:{PASSWORD}@db.internal/shop",
        "postgresql://app:Zx9-q7Wv%40Pw@db.internal/shop",
        f"app:{PASSWORD}@db.internal/shop",
        f"postgresql://db.internal/shop?user=app&password={PASSWORD}",
    ],
)
def test_the_password_never_shows(url: str) -> None:
    assert_no_password(redact_url(url).replace("%40", "@"))
    try:
        settings = DatabaseSettings(url=url)
    except ValidationError as exc:
        assert_no_password(str(exc))
        assert_no_password(repr(exc))
    else:
        for text in (repr(settings), str(settings), settings.redacted_url):
            assert_no_password(text)
            assert_no_password(text.replace("%40", "@"))


def test_engine_options_follow_the_settings() -> None:
    settings = DatabaseSettings(
        url="postgresql://u@h/d",
        pool_size=3,
        max_overflow=0,
        pool_timeout=2.5,
        statement_timeout=1500,
        client_connection_check_interval=250,
        application_name="billing",
        connect_timeout=4,
        ssl="require",
        isolation_level="SERIALIZABLE",
    )
    options = settings.engine_options()
    assert options["pool_size"] == 3
    assert options["max_overflow"] == 0
    assert options["pool_timeout"] == 2.5
    assert options["isolation_level"] == "SERIALIZABLE"
    assert options["connect_args"] == {
        "server_settings": {
            "application_name": "billing",
            "statement_timeout": "1500",
            "client_connection_check_interval": "250",
        },
        "ssl": "require",
        "timeout": 4,
        "command_timeout": 10.0,
    }


def test_pgbouncer_mode_turns_off_both_statement_caches() -> None:
    settings = DatabaseSettings(url="postgresql://u@h/d", pgbouncer=True)
    assert settings.engine_options()["connect_args"] == {**DEFAULT_BOUNDS, "statement_cache_size": 0}
    assert settings.engine_url().query["prepared_statement_cache_size"] == "0"


def test_sqlite_in_memory_gets_no_pool_sizing() -> None:
    options = DatabaseSettings(url="sqlite:///:memory:").engine_options()
    assert "pool_size" not in options
    assert "pool_size" in DatabaseSettings(url="sqlite:///file.db").engine_options()


def test_postgres_only_settings_on_sqlite_are_an_error_not_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    expected = r"statement_timeout \(DATABASE_STATEMENT_TIMEOUT\) is supported on PostgreSQL"
    with pytest.raises(ValueError, match=expected):
        DatabaseSettings(url="sqlite:///file.db", statement_timeout=100)
    monkeypatch.setenv("DATABASE_URL", "sqlite:///file.db")
    monkeypatch.setenv("DATABASE_PGBOUNCER", "true")
    with pytest.raises(ValueError, match=r"^Invalid database settings: pgbouncer \(DATABASE_PGBOUNCER\) is supported"):
        Database()


def test_a_bad_number_names_the_field_and_hides_the_input(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_POOL_SIZE", "abc")
    with pytest.raises(ValidationError, match="pool_size") as caught:
        DatabaseSettings(url=f"postgresql://app:{PASSWORD}@h/d")
    assert "abc" not in str(caught.value)
    assert_no_password(str(caught.value))


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("DATABASE_POOL_SIZE", "abc", "DATABASE_POOL_SIZE: Input should be a valid integer"),
        ("DATABASE_URL", f"postgresql+psycopg2://app:{PASSWORD}@h/d", "DATABASE_URL: 'postgresql+psycopg2' in"),
        ("DATABASE_URL", f"nodriver://app:{PASSWORD}@h/d", "DATABASE_URL: No async driver is known for 'nodriver'"),
        ("DATABASE_SSL", "sometimes", "DATABASE_SSL: Input should be 'disable'"),
    ],
)
def test_a_bad_environment_variable_is_one_error_that_names_it(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, expected: str
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://app@h/d")
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=r"^Invalid database settings: ") as caught:
        Database()
    message = str(caught.value)
    assert expected in message
    assert "sometimes" not in message
    assert "abc" not in message
    assert_no_password(message)
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__


def test_a_bad_url_argument_is_named_as_the_argument() -> None:
    with pytest.raises(ValueError, match=r"url=: 'sqlite\+pysqlite' in"):
        Database("sqlite+pysqlite:///x.db")


def test_no_url_is_a_clear_error_when_an_engine_is_needed() -> None:
    with pytest.raises(ValueError, match="set the DATABASE_URL environment variable"):
        DatabaseSettings().engine_url()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"postgresql://app:{PASSWORD}@db.internal/shop", "postgresql://app:***@db.internal/shop"),
        ("postgresql://app:Zx9-q7Wv%40Pw@db.internal/shop", "postgresql://app:***@db.internal/shop"),
        (f"app:{PASSWORD}@db.internal/shop", "app:***@db.internal/shop"),
        (
            f"postgresql://db.internal/shop?user=app&password={PASSWORD}&sslmode=require",
            "postgresql://db.internal/shop?user=app&password=***&sslmode=require",
        ),
        ("postgresql://app@db.internal/shop", "postgresql://app@db.internal/shop"),
    ],
)
def test_the_redacted_url_is_exactly_the_url_less_its_password(url: str, shown: str) -> None:
    # Exact text, not only "no 4-character piece of the password": a split at the first "@" of a password that
    # holds one leaves its tail ("@Pw") in the host part, and no 4-character piece of it.
    assert redact_url(url) == shown


# --- the bounds of every wait (docs/how-to/timeouts.md) ------------------------------------------------------

TIMEOUTS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "how-to" / "timeouts.md"


def documented_defaults() -> dict[str, float]:
    """The defaults in the table of docs/how-to/timeouts.md: ``| `DATABASE_X` | ... | 5 s | ...``."""
    rows = re.findall(r"^\| `DATABASE_([A-Z_]+)` \| [^|]* \| (\d+(?:\.\d+)?) s \|", TIMEOUTS_PAGE.read_text(), re.M)
    return {name.lower(): float(seconds) for name, seconds in rows}


def test_the_default_bounds_are_the_documented_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CONNECT_TIMEOUT", "COMMAND_TIMEOUT", "CLEANUP_TIMEOUT", "POOL_TIMEOUT"):
        monkeypatch.delenv(f"DATABASE_{name}", raising=False)
    documented = documented_defaults()
    assert documented == {"connect_timeout": 5.0, "command_timeout": 10.0, "pool_timeout": 10.0, "cleanup_timeout": 5.0}
    settings = DatabaseSettings(url="postgresql://u@h/d")
    assert {name: getattr(settings, name) for name in documented} == documented
    options = settings.engine_options()
    assert options["pool_timeout"] == documented["pool_timeout"]
    assert (
        options["connect_args"]
        == DEFAULT_BOUNDS
        == {
            "timeout": documented["connect_timeout"],
            "command_timeout": documented["command_timeout"],
        }
    )
    assert Database(settings=settings, name="bounds").cleanup_timeout == documented["cleanup_timeout"]


def test_the_bounds_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://u@h/d")
    monkeypatch.setenv("DATABASE_COMMAND_TIMEOUT", "2.5")
    monkeypatch.setenv("DATABASE_CLEANUP_TIMEOUT", "1.5")
    settings = DatabaseSettings()
    assert settings.engine_options()["connect_args"]["command_timeout"] == 2.5
    assert Database(settings=settings, name="bounds_env").cleanup_timeout == 1.5


def test_the_command_timeout_can_be_turned_off() -> None:
    settings = DatabaseSettings(url="postgresql://u@h/d", command_timeout=None)
    assert "command_timeout" not in settings.engine_options()["connect_args"]


def test_the_urls_timeouts_win_over_the_defaults_but_not_over_a_setting() -> None:
    """asyncpg's timeout= and command_timeout= in the URL worked before the defaults came: they still do."""
    url = "postgresql://u@h/d?timeout=3&command_timeout=6"
    assert DatabaseSettings(url=url).engine_options()["connect_args"] == {"timeout": 3.0, "command_timeout": 6.0}
    assert DatabaseSettings(url=url, command_timeout=6).engine_options()["connect_args"]["command_timeout"] == 6.0
    with pytest.raises(ValueError, match=r"command_timeout=6 in the URL and DATABASE_COMMAND_TIMEOUT=2\.0"):
        DatabaseSettings(url=url, command_timeout=2)


def test_sqlite_keeps_its_own_timeout_and_refuses_a_command_timeout(tmp_path: Path) -> None:
    """The defaults change nothing on SQLite: aiosqlite's timeout (its lock wait) stays the URL's or SQLite's own,
    and command_timeout, asyncpg's, is an error only when asked for."""
    settings = DatabaseSettings(url=f"sqlite:///{tmp_path}/app.db")
    assert "connect_args" not in settings.engine_options()
    assert Database(settings=settings, name="bounds_sqlite").cleanup_timeout == 5.0
    with pytest.raises(ValueError, match=r"command_timeout \(DATABASE_COMMAND_TIMEOUT\) is supported on PostgreSQL"):
        DatabaseSettings(url="sqlite:///file.db", command_timeout=3)
