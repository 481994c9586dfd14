"""FastAPI: ``app.add_middleware``. Serve with ``uvicorn examples.frameworks.fastapi_app:app``."""

from __future__ import annotations

from fastapi import FastAPI
from sqlalchemy import text

from asgi_db_session import DBSessionMiddleware, current_session


async def count_tables() -> int:
    """A service function: it reaches the request's session without being handed it."""
    count: int = (await current_session().execute(text("SELECT count(*) FROM information_schema.tables"))).scalar_one()
    return count


app = FastAPI()
# FastAPI's middleware stack (Starlette's) sees the lifespan scope, as the app's own lifespan does.
app.add_middleware(DBSessionMiddleware, commit_on_success=True)


@app.get("/")
async def tables() -> dict[str, int]:
    return {"tables": await count_tables()}
