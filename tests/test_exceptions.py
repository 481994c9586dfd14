"""One exception base for the package, each builtin base kept, and every message text in exceptions.py."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import asgi_db_session
from asgi_db_session import (
    AsgiDbSessionError,
    CommitFailedError,
    CommitOutcomeUnknownError,
    ConcurrentSessionUseError,
    DatabaseUnavailableError,
    NoSessionError,
    UnknownDatabaseError,
    UsageError,
    exceptions,
    get_database,
    query_stats,
)
from asgi_db_session.exceptions import NO_DATABASE, NOT_COUNTING

PACKAGE = Path(asgi_db_session.__file__).parent


def _exception_classes() -> list[type[BaseException]]:
    return [
        value
        for value in vars(exceptions).values()
        if isinstance(value, type) and issubclass(value, BaseException) and value.__module__ == exceptions.__name__
    ]


def test_every_exception_of_the_package_derives_from_its_base() -> None:
    classes = _exception_classes()
    assert len(classes) == 8
    for cls in classes:
        assert issubclass(cls, AsgiDbSessionError), cls
        assert cls.__name__ in asgi_db_session.__all__


@pytest.mark.parametrize(
    ("cls", "builtin"),
    [
        (NoSessionError, RuntimeError),
        (ConcurrentSessionUseError, RuntimeError),
        (UsageError, RuntimeError),
        (UnknownDatabaseError, LookupError),
        (DatabaseUnavailableError, ConnectionError),
    ],
)
def test_each_keeps_the_builtin_base_its_meaning_calls_for(cls: type[Exception], builtin: type[Exception]) -> None:
    assert issubclass(cls, builtin)


def test_a_failed_commit_is_no_runtime_error() -> None:
    # An app's handler for RuntimeError must not catch it: the client got an error status, the server must hear.
    assert not issubclass(CommitFailedError, RuntimeError)


def test_an_unknown_commit_outcome_is_no_connection_error_and_carries_the_transaction_id() -> None:
    # Not a ConnectionError: code that retries on one would save the data twice if the COMMIT had gone through.
    error = CommitOutcomeUnknownError("lost", "742")
    assert not isinstance(error, ConnectionError | RuntimeError)
    assert (str(error), error.transaction_id) == ("lost", "742")


def test_the_module_docstring_draws_every_exception() -> None:
    tree = exceptions.__doc__
    assert tree is not None
    for cls in _exception_classes():
        assert cls.__name__ in tree, cls


def test_an_unknown_database_is_a_lookup_error_and_still_a_no_session_error() -> None:
    with pytest.raises(UnknownDatabaseError) as caught:
        get_database("never-configured")
    assert isinstance(caught.value, LookupError)
    assert isinstance(caught.value, NoSessionError)  # what it was before it had a class of its own
    assert str(caught.value) == NO_DATABASE.format(name="never-configured")


def test_query_stats_outside_a_counting_request_is_a_usage_error() -> None:
    with pytest.raises(UsageError) as caught:
        query_stats("never-counted")
    assert isinstance(caught.value, RuntimeError)
    assert str(caught.value) == NOT_COUNTING.format(name="never-counted")


def _literal_messages(source: str) -> list[str]:
    """``raise X("...")`` and ``raise X(f"...")`` in ``source``: a message text written where it is raised."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Raise)
            and isinstance(node.exc, ast.Call)
            and node.exc.args
            and isinstance(node.exc.args[0], ast.Constant | ast.JoinedStr | ast.BinOp)
        ):
            found.append(ast.unparse(node.exc))
    return found


def test_every_message_text_lives_in_exceptions_py() -> None:
    written_in_place = {
        path.name: _literal_messages(path.read_text(encoding="utf-8"))
        for path in sorted(PACKAGE.glob("*.py"))
        if path.name != "exceptions.py"
    }
    assert {name: found for name, found in written_in_place.items() if found} == {}


def test_the_message_finder_finds_one() -> None:
    assert _literal_messages("raise ValueError(f'bad {x}')\nraise ValueError(TEXT.format(x=x))\n") == [
        "ValueError(f'bad {x}')"
    ]


def test_exceptions_module_imports_nothing_of_the_package() -> None:
    # The floor every module may import: it must need none of them.
    source = inspect.getsource(exceptions)
    imports = [node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom) and node.level]
    assert imports == []
