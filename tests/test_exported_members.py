"""The public API is exactly what __all__ says, sorted, and every name in it is importable; the package's
other public modules say what they export, and define nothing else without an underscore."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path
from types import ModuleType

import pytest

import asgi_db_session

from .docs_code import DOCS, blocks, pages


def test_all_is_sorted_and_complete() -> None:
    assert asgi_db_session.__all__ == sorted(asgi_db_session.__all__)
    public = {
        name
        for name, value in vars(asgi_db_session).items()
        if not name.startswith("_") and not isinstance(value, ModuleType)
    }
    assert public == set(asgi_db_session.__all__) - {"__version__"}


def test_exported_names_live_where_they_say() -> None:
    for name in asgi_db_session.__all__:
        member = getattr(asgi_db_session, name)
        if name != "__version__":
            assert member.__module__.startswith("asgi_db_session"), name


def test_version_is_a_string() -> None:
    assert isinstance(asgi_db_session.__version__, str)


PACKAGE = Path(asgi_db_session.__file__).parent
PUBLIC_MODULES = sorted(path.stem for path in PACKAGE.glob("*.py") if not path.stem.startswith("_"))


def _defined_names(module: str) -> set[str]:
    """The names a module's source binds at its top level: functions, classes and assignments."""
    names: set[str] = set()
    for node in ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8")).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(target.id for target in node.targets if isinstance(target, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def _public_module(name: str) -> ModuleType:
    if name in ("fastapi", "sqlmodel"):
        pytest.importorskip(name)
    return importlib.import_module(f"asgi_db_session.{name}")


def test_the_public_modules_are_the_ones_documented() -> None:
    # A new public module must be a choice: add it here, and give it an __all__.
    assert PUBLIC_MODULES == [
        "commit_hooks",
        "database",
        "error_responses",
        "exceptions",
        "fastapi",
        "health",
        "middleware",
        "query_insight",
        "replay",
        "retry",
        "route_policy",
        "scope",
        "settings",
        "sqlmodel",
        "testing",
    ]


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_every_public_module_declares_a_sorted_all_of_names_it_has(name: str) -> None:
    module = _public_module(name)
    exported = vars(module).get("__all__")
    assert isinstance(exported, list), f"asgi_db_session.{name} has no __all__"
    assert exported == sorted(exported)
    assert len(set(exported)) == len(exported)
    for member in exported:
        assert hasattr(module, member), f"asgi_db_session.{name}.__all__ names {member}, which it does not have"


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_nothing_undeclared_is_importable_without_an_underscore(name: str) -> None:
    """What a public module defines is in its __all__ or starts with an underscore: an API reference (which
    documents __all__) then shows all of the API and nothing of the internals."""
    module = _public_module(name)
    exported = set(module.__all__)
    undeclared = {member for member in _defined_names(name) if not member.startswith("_")} - exported
    # Classes and functions the module holds under a public name, wherever it got them from in the package.
    undeclared |= {
        member
        for member, value in vars(module).items()
        if not member.startswith("_")
        and getattr(value, "__module__", None) == module.__name__
        and member not in exported
    }
    assert undeclared == set()


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_every_exported_class_and_function_has_a_docstring(name: str) -> None:
    module = _public_module(name)
    for member in module.__all__:
        value = getattr(module, member)
        if isinstance(value, type) or inspect.isfunction(value):
            assert inspect.getdoc(value), f"asgi_db_session.{name}.{member} has no docstring"


def test_the_package_re_exports_only_what_its_modules_declare() -> None:
    for member in set(asgi_db_session.__all__) - {"__version__"}:
        value = getattr(asgi_db_session, member)
        home = importlib.import_module(value.__module__)
        if not home.__name__.rpartition(".")[2].startswith("_"):
            assert member in home.__all__, f"{member} is exported by the package but not by {home.__name__}"


def _docs_python() -> str:
    """Every ```python block of README.md and docs/**/*.md."""
    return "\n".join(block.code for page in pages() for block in blocks(page) if block.language == "python")


def test_the_docs_import_only_declared_names() -> None:
    imports = re.findall(r"^\s*from (asgi_db_session(?:\.\w+)?) import \(?([\w, ]+)", _docs_python(), re.MULTILINE)
    assert imports
    for module_name, names in imports:
        module = _public_module(module_name.partition(".")[2]) if "." in module_name else asgi_db_session
        for member in (name.strip() for name in names.split(",")):
            if member:
                assert member in module.__all__, (
                    f"the docs import {member} from {module_name}, which does not declare it"
                )


def test_the_api_overview_table_names_every_exported_member_and_no_other() -> None:
    page = (DOCS / "reference" / "overview.md").read_text(encoding="utf-8")
    api = page.partition("\n## Names\n")[2].partition("\n## ")[0]
    first_cells = [line.split("|")[1] for line in api.splitlines() if line.startswith("| `")]
    names = {match for cell in first_cells for match in re.findall(r"`(\w+)", cell)}
    assert names <= set(asgi_db_session.__all__), names - set(asgi_db_session.__all__)
    assert set(asgi_db_session.__all__) - {"__version__"} <= names, set(asgi_db_session.__all__) - names
