"""MkDocs hooks: the settings reference page's table, rendered from ``DatabaseSettings``' fields at build time;
and the benchmarks' sweep plot, served from where the benchmark writes it.

The table is never written by hand, so it cannot drift from the code: a new field appears in it, and a field
without a docstring fails the build (tests/test_docs_site.py runs the same function without MkDocs). The plot
is not copied into docs/ either: a copy would go stale at the next ``benchmarks/sweep.py`` run.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings

SETTINGS_TABLE_MARKER = "<!-- settings-table -->"
SETTINGS_PAGE = "reference/settings.md"
# benchmarks/results/sweep.png, at this address of the site (docs/explanation/performance.md shows it).
SWEEP_PLOT = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "sweep.png"
SWEEP_PLOT_URI = "explanation/sweep.png"
NO_DOCSTRING = (
    "{model}.{field} has no docstring: write one under the field (a string on the next line), "
    "it is the field's description on the settings page"
)


def field_docstrings(model: type[BaseSettings]) -> dict[str, str]:
    """Each field's docstring (the string literal right under it) in the class bodies of ``model`` and its bases."""
    found: dict[str, str] = {}
    # Bases first, so that a subclass's docstring for a field it redefines wins.
    for cls in reversed(model.__mro__):
        if not issubclass(cls, BaseSettings) or cls is BaseSettings:
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
        body = next(node for node in tree.body if isinstance(node, ast.ClassDef)).body
        for statement, following in zip(body, body[1:], strict=False):
            if (
                isinstance(statement, ast.AnnAssign)
                and isinstance(statement.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                found[statement.target.id] = inspect.cleandoc(following.value.value)
    return found


def _type_name(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        return " \\| ".join(_type_name(arg) for arg in get_args(annotation))
    if origin is Literal:
        return " \\| ".join(f"`{arg!r}`" for arg in get_args(annotation))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(arg) for arg in get_args(annotation))}]"
    if annotation is type(None):
        return "None"
    return str(getattr(annotation, "__name__", annotation))


def _default(field: FieldInfo) -> str:
    default = field.get_default(call_default_factory=True)
    return "(required)" if default is PydanticUndefined else f"`{default!r}`"


def _one_line(text: str) -> str:
    # A table cell is one line; the docstrings' double backticks are Markdown code spans as they are.
    return " ".join(text.split()).replace("|", "\\|")


def settings_table(model: type[BaseSettings]) -> str:
    """The Markdown table of ``model``'s fields: variable, field, type, default, description."""
    prefix = model.model_config.get("env_prefix", "")
    docstrings = field_docstrings(model)
    rows = [
        "| variable | field | type | default | description |",
        "|---|---|---|---|---|",
    ]
    for name, field in model.model_fields.items():
        if name not in docstrings:
            raise ValueError(NO_DOCSTRING.format(model=model.__name__, field=name))
        rows.append(
            f"| `{prefix}{name.upper()}` | `{name}` | {_type_name(field.annotation)} | {_default(field)} "
            f"| {_one_line(docstrings[name])} |"
        )
    return "\n".join(rows)


def on_page_markdown(markdown: str, *, page: Any, config: Any, files: Any) -> str:
    """Put the generated table where reference/settings.md has its marker."""
    if page.file.src_uri != SETTINGS_PAGE:
        return markdown
    if SETTINGS_TABLE_MARKER not in markdown:
        raise ValueError(f"{SETTINGS_PAGE} has lost its {SETTINGS_TABLE_MARKER} line, where the table goes")
    from asgi_db_session import DatabaseSettings

    return markdown.replace(SETTINGS_TABLE_MARKER, settings_table(DatabaseSettings))


def on_files(files: Any, *, config: Any) -> Any:
    """Add the sweep plot to the site's files, so that the performance page's image link resolves."""
    from mkdocs.structure.files import File

    files.append(File.generated(config, SWEEP_PLOT_URI, abs_src_path=str(SWEEP_PLOT)))
    return files
