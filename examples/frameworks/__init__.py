"""One module per ASGI framework: where DBSessionMiddleware goes so that it sees the lifespan (startup check,
disposal at shutdown) and every request. docs/how-to/frameworks.md shows them; tests/test_framework_docs.py runs
each. Each reads its database from ``DATABASE_URL`` (and the other ``DATABASE_*`` variables)."""
