"""Observability: Prometheus metrics, structured logs and request ids.

- ``context``: the request id and run id of the code running now (contextvars), shared by the
  API, the Celery client and the workers.
- ``request_id``: the ``X-Request-ID`` ASGI middleware.
- ``logging``: JSON (or text) log lines that carry the request id and run id.
- ``metrics`` / ``uncertainty``: GET /metrics, collected per API process.
"""
