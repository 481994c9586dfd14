"""Example applications built on asgi_db_session."""
