"""Settings: one pydantic-settings class, environment prefix ``MCDROP_``.

Embedded defaults (SQLite + kombu's filesystem transport under ``MCDROP_DATA_DIR``) need no
external services; set ``MCDROP_DATABASE_URL`` / ``MCDROP_BROKER_URL`` for PostgreSQL and Redis.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
import json
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MCDROP_", extra="ignore", frozen=True)

    data_dir: Path = Path("var")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default sqlite:///<data_dir>/mcdrop.sqlite3"
    )
    broker_url: str | None = Field(
        default=None, description="Celery broker URL; default: kombu filesystem transport in <data_dir>/broker"
    )
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "info"

    device: Literal["auto", "cpu", "cuda"] = "auto"
    # torch intra-op threads: the API serves many small requests (1 is fastest and never stalls
    # against the worker); the worker trains (see worker_torch_threads).
    api_torch_threads: int = 1
    # The API process's garbage collector: its startup objects frozen out of collection, and the
    # youngest generation collected every this many net container allocations (Python's default,
    # 700, made collections ~10 % of the API's CPU under load; 0 keeps Python's defaults).
    api_gc_threshold: int = Field(default=50_000, ge=0)
    # FastAPI's native OpenTelemetry instrumentation (spans, metrics and logs to the global providers
    # an OpenTelemetry SDK sets up). Off by default: mcdrop has its own Prometheus metrics, and
    # without an SDK the instrumentation only asks the OpenTelemetry API for its providers on every
    # request (~8 µs of CPU each here, with three environment lookups).
    otel: bool = Field(default=False, description="FastAPI's OpenTelemetry instrumentation, for a process that sets up an OpenTelemetry SDK")
    worker_torch_threads: int = Field(
        default=0, ge=0,
        description="torch intra-op threads per worker process; 0: the usable cores shared out among the worker's "
                    "processes, one core left to the API under `mcdrop up` (service.tuning.worker_torch_threads)",
    )
    worker_concurrency: int = 1
    # Set by `mcdrop up` for the worker it starts beside the API on the same machine.
    worker_beside_api: bool = False

    max_upload_bytes: int = 50 * 1024 * 1024
    max_dataset_rows: int = 1_000_000
    max_dataset_features: int = 10_000
    max_predict_inputs: int = 1024
    max_samples: int = 10_000
    max_epochs: int = 100_000
    model_cache_size: int = 32
    broker_polling_interval: float = 0.1

    # Jobs that survive (leases, reconciler, retries)
    lease_s: float = Field(default=30.0, gt=0, description="a running run's lease; renewed every lease_s/3")
    heartbeat_interval_s: float = Field(default=5.0, gt=0, description="worker heartbeat and reconciler period")
    reconcile_interval_s: float = Field(default=5.0, ge=0, description="0 disables the reconciler in this process")
    redispatch_after_s: float = Field(
        default=60.0, gt=0,
        description="re-send a queued run's message after this long without a worker taking it (doubles each time, capped at 1 h)",
    )
    transient_retry_s: float = Field(default=120.0, ge=0, description="how long a worker retries database writes")
    checkpoint_interval_s: float = Field(
        default=1.0, ge=0,
        description="a training run writes its finished epochs' metrics and events, epochs_done and a checkpoint "
                    "in one transaction at most this often (and after its last epoch); 0: after every epoch",
    )
    task_max_retries: int = 5
    idempotency_ttl_s: float = 24 * 3600.0
    # Webhooks: HMAC-SHA256 signing secret shared by every process; when unset, one is generated
    # into <data_dir>/webhook_secret (fine for one host; set it for several).
    webhook_secret: SecretStr | None = None
    webhook_timeout_s: float = 5.0
    webhook_max_attempts: int = 8
    webhook_backoff_s: float = 2.0
    # Predict micro-batching (service/runs/batching.py): concurrent unseeded requests for one
    # run and one T share a forward; seeded requests always run alone.
    predict_batching: bool = True
    predict_batch_wait_ms: float = Field(default=2.0, ge=0, description="longest wait for other requests to join a batch")
    predict_batch_max_inputs: int = Field(default=256, ge=1, description="most input rows in one merged forward")
    # Model registry (service/registry): each API replica polls the aliases this often and
    # preloads a moved alias's model before switching to it; 0: no polling (resolve per request).
    registry_refresh_interval_s: float = Field(default=1.0, ge=0, description="alias refresher poll period; 0 disables it")
    # Acquisition (POST /v1/models/{name}/acquire): pool limits and the rows sampled at a time.
    acquire_max_pool_rows: int = Field(default=100_000, ge=1, description="most rows in an acquisition pool")
    acquire_max_row_samples: int = Field(default=5_000_000, ge=1, description="most pool rows × samples (T) per request")
    acquire_chunk_rows: int = Field(default=1024, ge=1, description="pool rows sampled together")

    # Observability (service/observability): log lines as JSON objects or text; an optional
    # token for GET /metrics; origins allowed to call the API from a browser (empty: CORS off).
    log_format: Literal["text", "json"] = "text"
    metrics_token: SecretStr | None = Field(default=None, description="if set, GET /metrics needs `Authorization: Bearer <token>`")
    cors_origins: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(), description="comma-separated (or a JSON list) origins, e.g. https://dash.example.org; '*' for any",
    )

    # Auth: API keys (Authorization: Bearer <key>), each belonging to a tenant. "off" is only
    # accepted for an embedded server (SQLite + filesystem broker) bound to loopback.
    auth: Literal["on", "off"] = "on"
    auth_cache_s: float = Field(default=10.0, ge=0, description="how long a verified key is trusted without a database read (revocation delay)")

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _origins(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            value = json.loads(text) if text.startswith("[") else text.split(",")
        if isinstance(value, (list, tuple)):
            origins = tuple(str(origin).strip().rstrip("/") for origin in value if str(origin).strip())
            for origin in origins:
                scheme, _, host = origin.partition("://")
                if origin != "*" and (scheme not in ("http", "https") or not host or "/" in host or " " in host):
                    raise ValueError(f"{origin!r} is not an origin (scheme://host[:port], or '*')")
            return origins
        return value

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        # The embedded broker's folders must be absolute: worker and API may differ in cwd.
        return value.expanduser().resolve()

    @property
    def sqlalchemy_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'mcdrop.sqlite3'}"

    @property
    def celery_broker_url(self) -> str:
        return self.broker_url or "filesystem://localhost/"

    @property
    def embedded_broker(self) -> bool:
        return self.broker_url is None or self.broker_url.startswith("filesystem://")

    @property
    def embedded(self) -> bool:
        """SQLite and the filesystem broker: a single-machine service."""
        return self.sqlalchemy_url.startswith("sqlite") and self.embedded_broker

    @property
    def loopback(self) -> bool:
        return self.host in ("127.0.0.1", "localhost", "::1") or self.host.startswith("127.")

    @property
    def auth_enabled(self) -> bool:
        return self.auth == "on"

    def auth_problem(self) -> str | None:
        """Why this configuration must not start, or None."""
        if self.auth == "off" and not (self.embedded and self.loopback):
            return (
                "MCDROP_AUTH=off is only allowed for an embedded server (SQLite, filesystem broker) bound to "
                f"loopback; this one uses host {self.host!r}"
                + ("" if self.embedded else " with an external database or broker")
            )
        return None

    @property
    def broker_folder(self) -> Path:
        return self.data_dir / "broker"


@lru_cache
def get_settings() -> Settings:
    return Settings()
