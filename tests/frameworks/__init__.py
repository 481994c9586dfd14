"""One small app per ASGI framework, each serving the same routes through DBSessionMiddleware.

Every module has ``make_app(database) -> ASGI app``: the framework's own app, with the middleware placed where
docs/how-to/frameworks.md tells users to put it (where it also sees the lifespan scope). The routes, all answered
through the service functions of ``service.py``, which reach the request's session with ``current_session()``:

- ``GET /nodb``: no database at all (no session, no connection);
- ``POST /write?name=``: a row the middleware commits (two service calls, one session), answered 201;
- ``POST /reject?name=``: a row, then the framework's own way to answer 400: rolled back;
- ``POST /crash?name=``: a row, then an exception: rolled back, 500;
- ``POST /duplicate?name=``: a row whose name is taken, which the deferred unique constraint refuses at COMMIT:
  the client gets 409, never the app's 201;
- ``GET /stream?name=``: a streaming body that writes a row between two chunks;
- ``POST /background?name=``: a row written by the framework's background-task mechanism, where it has one;
- ``GET /sleep``: a statement that runs for a minute (to be cancelled).

``FRAMEWORKS`` (in ``registry.py``) names them all, for the tests and for the compatibility table.
"""
