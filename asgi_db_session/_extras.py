"""Optional dependencies: each comes with an extra of this package, and a missing one says which to install."""

from __future__ import annotations

from importlib.util import find_spec

from .exceptions import MISSING_EXTRA

# The module each async driver imports, for the drivers that an extra of this package installs.
DRIVER_EXTRAS = {"aiosqlite": "sqlite"}


def require(module: str, *, extra: str, needed_by: str) -> None:
    """Raise ModuleNotFoundError naming ``pip install 'asgi-db-session[<extra>]'`` when ``module`` is missing.

    Checked before the import (rather than translating the ImportError after it) so that an ImportError raised
    inside an installed but broken module is not mistaken for a missing one.
    """
    if find_spec(module) is None:
        raise ModuleNotFoundError(MISSING_EXTRA.format(needed_by=needed_by, module=module, extra=extra), name=module)
