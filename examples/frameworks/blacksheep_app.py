"""BlackSheep: wrap the app object. Serve with ``uvicorn examples.frameworks.blacksheep_app:asgi_app``."""

from __future__ import annotations

from blacksheep import Application, Response, json
from sqlalchemy import text

from asgi_db_session import DBSessionMiddleware, current_session

app = Application()


async def count_tables() -> int:
    """A service function: it reaches the request's session without being handed it."""
    count: int = (await current_session().execute(text("SELECT count(*) FROM information_schema.tables"))).scalar_one()
    return count


@app.router.get("/")
async def tables() -> Response:
    return json({"tables": await count_tables()})


# Around the app object: BlackSheep's own middlewares wrap request handlers, and never see the lifespan scope.
asgi_app = DBSessionMiddleware(app, commit_on_success=True)
