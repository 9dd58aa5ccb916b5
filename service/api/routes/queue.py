"""/v1/queue: what waits, what runs, and which workers are alive."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import CurrentTenant, SessionDep, SettingsDep
from service.jobs.workers_registry import QueueRead, overview

router = APIRouter(prefix="/v1/queue", tags=["queue"])


@router.get("", response_model=QueueRead)
def read_queue(session: SessionDep, settings: SettingsDep, tenant: CurrentTenant) -> QueueRead:
    """Runs queued and running per queue (from the database), and workers whose heartbeat was
    seen within three heartbeat intervals."""
    return overview(session, seen_within_s=3 * settings.heartbeat_interval_s + 1, tenant_id=tenant)
