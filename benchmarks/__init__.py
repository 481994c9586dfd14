"""Benchmarks of asgi_db_session against a bare app, a hand-written lower bound and its peers.

``python benchmarks/run.py`` measures throughput in-process (or over HTTP with ``--http``);
``python benchmarks/instructions.py`` counts instructions per request under callgrind. See README.md.
"""
