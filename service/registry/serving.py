"""What an API replica serves for a model name: its alias map, kept warm.

Each replica keeps a map ``(tenant, name, alias) -> (run, version)`` and a background thread
(:class:`AliasRefresher`) that polls the aliases every ``registry_refresh_interval_s``. When an
alias points somewhere new, the refresher loads the new run's model into the replica's
:class:`~service.runs.inference.ModelCache` FIRST and only then switches its map entry: a
request by alias never meets a cold model after a move, on any replica (each one follows the
database on its own; a replica serves the previous version until its own copy is loaded).

Pinning: the model cache is an LRU bounded by ``model_cache_size``. On every poll the refresher
touches each alias target (moving it to the recent end) and reloads any that was evicted, so
ad-hoc predictions of other runs evict those first. At most ``model_cache_size - 1`` distinct
alias targets are kept warm (the most recently moved ones; one slot stays for ad-hoc runs);
beyond that, the others are switched without preloading and load on their first request. A
target evicted between two polls and asked for before the next one loads on the request path.

Versions never change, so ``(tenant, name, version) -> run`` is remembered (bounded) after the
first lookup; a name by version then costs no database read either.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from service.config import Settings
from service.db import get_sessionmaker
from service.errors import InvalidState, NotFound
from service.registry import service as registry
from service.registry.schemas import DEFAULT_ALIAS
from service.runs import service as runs
from service.runs.inference import ModelCache
from service.runs.modelling import TrainedModel
from service.runs.models import RunStatus

log = logging.getLogger(__name__)

AliasKey = tuple[str, str, str]  # tenant, model name, alias
FULL_RELOAD_S = 30.0  # re-read every alias this often even if the cheap signature did not change
MAX_REMEMBERED_VERSIONS = 4096


def serving_model(settings: Settings, cache: ModelCache, run_id: uuid.UUID, tenant_id: str) -> TrainedModel:
    """The loaded model of a succeeded run of ``tenant_id``, from the cache or loaded into it
    (blocking: call it from a thread)."""
    model = cache.peek(run_id)
    if model is None:
        with get_sessionmaker(settings.sqlalchemy_url)() as session:
            row = runs.get_row(session, run_id, tenant_id)
            if row.status != RunStatus.SUCCEEDED:
                raise InvalidState(f"run {run_id} is {row.status}; predictions need a succeeded run")
            model = cache.get(run_id, lambda: runs.load_model(session, run_id, row.tenant_id))
    if model.tenant_id != tenant_id:
        raise NotFound("run", run_id)
    return model


@dataclass(frozen=True)
class Switch:
    """One alias map change on this replica (kept for monitoring and tests)."""

    key: AliasKey
    run_id: uuid.UUID
    version: int
    cached_at_switch: bool  # the model was in the cache when the entry switched
    at: float  # time.monotonic()


class ServingAliases:
    """This replica's alias map and remembered versions (see the module)."""

    def __init__(self, settings: Settings, cache: ModelCache) -> None:
        self.settings = settings
        self.cache = cache
        # True while an AliasRefresher keeps the map current; otherwise every alias is resolved
        # in the database (a map nobody refreshes would go stale).
        self.following = False
        self._targets: dict[AliasKey, registry.AliasTarget] = {}
        self._versions: OrderedDict[tuple[str, str, int], uuid.UUID] = OrderedDict()
        self._versions_lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        self._signature: tuple[Any, ...] | None = None
        self._full_at = 0.0
        self._failing: set[tuple[AliasKey, uuid.UUID]] = set()
        self._warm: dict[uuid.UUID, registry.AliasTarget] = {}  # run id -> an alias target that serves it
        self.switches: deque[Switch] = deque(maxlen=256)
        self.polls = 0

    # -- the request path ---------------------------------------------------------------
    def lookup(self, tenant_id: str, name: str, alias: str) -> registry.Target | None:
        """The followed target of an alias, or None (unknown here: ask the database)."""
        if not self.following:
            return None
        found = self._targets.get((tenant_id, name, alias))
        return registry.Target(found.run_id, found.version) if found is not None else None

    def remembered_version(self, tenant_id: str, name: str, version: int) -> registry.Target | None:
        with self._versions_lock:
            run_id = self._versions.get((tenant_id, name, version))
            if run_id is None:
                return None
            self._versions.move_to_end((tenant_id, name, version))
        return registry.Target(run_id, version)

    def remember_version(self, tenant_id: str, name: str, target: registry.Target) -> None:
        with self._versions_lock:
            self._versions[(tenant_id, name, target.version)] = target.run_id
            while len(self._versions) > MAX_REMEMBERED_VERSIONS:
                self._versions.popitem(last=False)

    def resolve(self, session: Session, tenant_id: str, name: str, alias: str | None, version: int | None) -> registry.Target:
        """Like ``registry.resolve_target``, from this replica's map where it can; otherwise
        from the database (blocking: call it from a thread)."""
        found = self.cached(tenant_id, name, alias, version)
        if found is not None:
            return found
        target = registry.resolve_target(session, tenant_id, name, alias, version)
        if version is not None:
            self.remember_version(tenant_id, name, target)
        return target

    def resolve_in_own_session(self, tenant_id: str, name: str, alias: str | None, version: int | None) -> registry.Target:
        with get_sessionmaker(self.settings.sqlalchemy_url)() as session:
            return self.resolve(session, tenant_id, name, alias, version)

    def cached(self, tenant_id: str, name: str, alias: str | None, version: int | None) -> registry.Target | None:
        """The target without a database read, if this replica knows it (never blocks)."""
        if alias is not None and version is not None:
            return None  # let resolve_target say what is wrong
        if version is not None:
            return self.remembered_version(tenant_id, name, version)
        return self.lookup(tenant_id, name, alias or DEFAULT_ALIAS)

    # -- the refresher's side -------------------------------------------------------------
    def refresh(self, force: bool = False) -> None:
        """Follow the aliases table: preload every new target, then switch to it (blocking)."""
        with self._refresh_lock:
            self.polls += 1
            with get_sessionmaker(self.settings.sqlalchemy_url)() as session:
                signature = registry.alias_signature(session)
                stale = force or signature != self._signature or time.monotonic() - self._full_at > FULL_RELOAD_S
                targets = registry.alias_targets(session) if stale else None
            if targets is not None:
                complete = self._switch(targets)
                self._signature = signature if complete else None  # a failed preload is retried next poll
                self._full_at = time.monotonic()
            self._keep_warm()

    def _warm_runs(self, targets: list[registry.AliasTarget]) -> dict[uuid.UUID, registry.AliasTarget]:
        """The runs to keep loaded: those of the most recently moved targets, at most the
        cache's size less one (a slot for ad-hoc runs; ``targets`` come most recently moved first)."""
        limit = max(1, self.cache.capacity - 1)
        chosen: dict[uuid.UUID, registry.AliasTarget] = {}
        for target in targets:
            if target.run_id not in chosen:
                if len(chosen) == limit:
                    break
                chosen[target.run_id] = target
        return chosen

    def _load(self, target: registry.AliasTarget) -> bool:
        try:
            serving_model(self.settings, self.cache, target.run_id, target.tenant_id)
        except Exception as exc:
            failing = ((target.tenant_id, target.name, target.alias), target.run_id)
            if failing not in self._failing:
                self._failing.add(failing)
                log.warning("cannot preload run %s for alias %r of model %r: %s: %s", target.run_id,
                            target.alias, target.name, type(exc).__name__, str(exc)[:300])
            return False
        return True

    def _switch(self, targets: list[registry.AliasTarget]) -> bool:
        """Apply the table's targets; False if a new target could not be preloaded (its entry
        keeps its previous target)."""
        warm = self._warm = self._warm_runs(targets)
        wanted = {(t.tenant_id, t.name, t.alias): t for t in targets}
        complete = True
        for key, target in wanted.items():
            current = self._targets.get(key)
            if current is not None and current.run_id == target.run_id:
                self._targets[key] = target
                continue
            if target.run_id in warm and not self._load(target):
                complete = False
                continue
            self._failing.discard((key, target.run_id))
            # The switch: only now does the request path see the new run (already loaded).
            cached = self.cache.peek(target.run_id) is not None
            self._targets[key] = target
            self.switches.append(Switch(key, target.run_id, target.version, cached, time.monotonic()))
            log.info("serving alias %r of model %r (tenant %s): version %d, run %s%s", target.alias, target.name,
                     target.tenant_id, target.version, target.run_id, "" if cached else " (not preloaded)")
        for key in [key for key in self._targets if key not in wanted]:
            del self._targets[key]
        return complete

    def _keep_warm(self) -> None:
        """Touch every warm target in the cache (so the LRU evicts others first); reload any
        that was evicted."""
        for run_id, target in self._warm.items():
            if self.cache.peek(run_id) is None:
                self._load(target)


class AliasRefresher:
    """Calls :meth:`ServingAliases.refresh` every ``registry_refresh_interval_s`` in a daemon
    thread (and marks the map as followed while it runs)."""

    def __init__(self, aliases: ServingAliases) -> None:
        self.aliases = aliases
        self.interval_s = aliases.settings.registry_refresh_interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mcdrop-alias-refresher", daemon=True)

    def start(self) -> AliasRefresher:
        self.aliases.following = True
        self._thread.start()
        return self

    def stop(self) -> None:
        self.aliases.following = False
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            try:
                self.aliases.refresh()
            except Exception as exc:  # the database may be away for a while: keep serving the map
                log.warning("alias refresher: %s: %s", type(exc).__name__, str(exc)[:300])
            if self._stop.wait(self.interval_s):
                return
