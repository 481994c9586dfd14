"""The tests that start other processes: servers (uvicorn, gunicorn, hypercorn, granian, the demos), throwaway
PostgreSQL clusters (a restart, a replica, SSL, a password role), PgBouncer, the ``alembic`` command in a project
of its own, the built wheel in a fresh venv, and the memory soak; with the helpers that start them.

``./dev test`` runs them with the in-process tests in ``tests/``; ``./dev test-fast`` (``pytest tests
--ignore=tests/system``) leaves them out.
"""
