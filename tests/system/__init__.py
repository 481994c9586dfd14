"""The tests that start other processes: servers (uvicorn, gunicorn, hypercorn, granian, the demos), throwaway
PostgreSQL clusters (a restart, a replica, SSL, a password role), PgBouncer, Alembic and pytest runs in projects
of their own, and the memory soak; with the helpers that start them.

``./dev test`` runs them with the in-process tests in ``tests/``; ``./dev test-fast`` leaves them out.
"""
