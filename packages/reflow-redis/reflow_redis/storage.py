"""``RedisStorage``: the storage contract on Redis, for many workers on many machines.

Design in brief (the scripts themselves are in ``lua/``, the key layout in
``lua/lib.lua``):

* Every method that checks and writes is one Lua script, so the check and the write
  are one atomic step on the server; reads of more than one key are scripts too, so
  they see one consistent state. Nothing is read, decided in Python, then written —
  except ``claim_due_schedule``, whose next firing needs the cron library: it reads
  the due schedule, computes the next time, and advances with a script guarded on the
  old ``next_run_at`` (so one occurrence fires once), retrying if it lost the race.
* The server's clock is the store's clock: scripts read ``TIME``. A ``clock`` given to
  the constructor is a test-only override, sent as each script's ``now`` argument
  (as the PostgreSQL adapter sends ``reflow_now(%(now)s)``); production passes ``''``.
* Values go through :mod:`reflow_core.codec` before any script runs and are stored as
  its exact text. Identifiers are length-prefixed inside keys, so no id, name or key
  can make another's key whatever it contains.
* Driver errors become :class:`StorageError` in one place, :meth:`RedisStorage._run`.
  The client never retries a command on its own: a script whose reply was lost may have
  run, and running it again could claim twice or buffer an event twice.
* Work notifications: scripts ``PUBLISH`` on ``<prefix>:work``; :mod:`.notify` listens.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any

from reflow_core.errors import ConfigError, StorageError
from reflow_core.identifiers import (
    MAX_SCHEDULE_KEY_LENGTH,
    check_holder,
    check_identifier,
    check_names,
    check_run,
    check_schedule,
    check_step,
    is_identifier,
)
from reflow_core.schedule import next_fire_time
from reflow_core.storage import Clock, check_limit, check_purge_args
from reflow_core.types import (
    ClaimedRun,
    ClaimedSchedule,
    ConsumeResult,
    CreateRunResult,
    ErrorInfo,
    EventRecord,
    LeaseHolder,
    RunFilter,
    RunStatus,
    Schedule,
    StepResult,
    WorkflowRun,
)

from .keys import DEFAULT_PREFIX, check_prefix, list_bound, list_index
from .notify import listen
from .persistence import Persistence, read_persistence
from .records import (
    dump_error,
    dump_holder,
    dump_recurrence,
    dump_value,
    run_fields,
    step_fields,
    to_event,
    to_hash,
    to_run,
    to_schedule,
    to_step,
)
from .scripts import SCRIPT_NAMES, script_source
from .url import split_url, with_prefix

__all__ = ["LAYOUT_VERSION", "RedisStorage"]

LAYOUT_VERSION = 1
"""The key layout this code reads and writes (``<prefix>:meta`` field ``layout``)."""

_SCHEDULE_RACE_RETRIES = 10


def _driver_errors() -> tuple[type[BaseException], ...]:
    from redis.exceptions import RedisError

    return (RedisError, OSError)


class RedisStorage:
    """Reflow storage on Redis (redis-py asyncio), shared by any number of workers.

    ``url`` is a ``redis://`` or ``rediss://`` URL; ``prefix`` (letters, digits, ``_``
    ``-`` ``.``) names the store inside the database: by default the URL's
    ``reflow_prefix`` parameter, else ``"reflow"``. Nothing connects until
    :meth:`initialize`. With ``require_durable``, :meth:`initialize` refuses a server
    that does not persist what it acknowledges (see :mod:`reflow_redis.persistence`).

    Time is the server's (``TIME``). ``clock`` is for tests only: when given, its value
    replaces the server's "now" in every script.
    """

    listen_timeout_s: float = 30.0
    """How long the listener waits for a message before pinging its connection."""
    reconnect_initial_s: float = 0.1
    reconnect_max_s: float = 10.0
    """Bounds of the listener's exponential reconnection backoff."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str | None = None,
        clock: Clock | None = None,
        max_connections: int = 20,
        require_durable: bool = False,
        socket_timeout_s: float | None = 30.0,
        pool_timeout_s: float = 30.0,
    ) -> None:
        base_url, url_prefix = split_url(url)
        self.prefix = check_prefix(prefix or url_prefix or DEFAULT_PREFIX)
        if max_connections < 1:
            raise ConfigError(f"max_connections must be at least 1, got {max_connections}")
        self.url: str | None = with_prefix(base_url, self.prefix)
        self.channel = f"{self.prefix}:work".encode()
        """The pub/sub channel: one per prefix, so separate stores never cross-talk."""
        self._base_url = base_url
        self._clock = clock
        self._max_connections = max_connections
        self._require_durable = require_durable
        self._socket_timeout_s = socket_timeout_s
        self._pool_timeout_s = pool_timeout_s
        self._client: Any = None
        self._scripts: dict[str, Any] = {}
        self._closed = False
        self._pubsubs: set[Any] = set()

    def __repr__(self) -> str:
        return f"RedisStorage(prefix={self.prefix!r})"

    # -- plumbing ---------------------------------------------------------------------

    @contextlib.contextmanager
    def _translated(self, operation: str) -> Iterator[None]:
        """THE place driver errors become :class:`StorageError` (driver error as cause)."""
        try:
            yield
        except _driver_errors() as exc:
            raise StorageError(operation, str(exc) or type(exc).__name__) from exc

    def _make_client(self) -> Any:
        from redis.asyncio import BlockingConnectionPool, Redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # A blocking pool: a call beyond max_connections waits for a free connection
        # (up to pool_timeout_s) instead of failing at once, as redis-py's default pool
        # does; an engine with concurrency 25 makes that many calls at a time.
        pool = BlockingConnectionPool.from_url(
            self._base_url,
            max_connections=self._max_connections,
            timeout=self._pool_timeout_s,
            # No automatic retry: a script whose reply was lost may have run.
            retry=Retry(NoBackoff(), 0),
            # PING a connection idle this long before lending it, so one a server
            # restart killed is replaced instead of failing the next call.
            health_check_interval=10,
            socket_timeout=self._socket_timeout_s,
            socket_connect_timeout=10,
            # CLIENT LIST shows which store a connection serves (the pub/sub one too).
            client_name=f"reflow:{self.prefix}",
        )
        return Redis.from_pool(pool)  # the client owns (and closes) its pool

    async def _run(self, operation: str, script: str, *args: Any) -> Any:
        """Run one script with the prefix and the clock argument in front."""
        if self._client is None:
            state = "closed" if self._closed else "not initialized; call initialize() first"
            raise StorageError(operation, f"the Redis adapter is {state}")
        now = "" if self._clock is None else str(self._clock())
        with self._translated(operation):
            return await self._scripts[script](args=[self.prefix, now, *args])

    # -- lifecycle --------------------------------------------------------------------

    async def initialize(self) -> None:
        """Connect (once), check the server and the stored layout, load the scripts."""
        if self._closed:
            raise StorageError("initialize", "the Redis adapter is closed")
        if self._client is not None:
            return
        client = self._make_client()
        try:
            with self._translated("initialize"):
                await client.ping()
                if self._require_durable:
                    persistence = await read_persistence(client)
                    if not persistence.durable:
                        raise ConfigError(
                            f"RedisStorage(require_durable=True) at {self._base_url}: "
                            f"{persistence.describe()}"
                        )
                meta = f"{self.prefix}:meta"
                await client.hsetnx(meta, "layout", LAYOUT_VERSION)
                stored = int(await client.hget(meta, "layout"))
                if stored > LAYOUT_VERSION:
                    raise StorageError(
                        "initialize",
                        f"prefix {self.prefix!r} holds key layout {stored}, newer than this "
                        f"reflow-redis understands ({LAYOUT_VERSION}); upgrade reflow-redis",
                    )
                scripts = {}
                for name in SCRIPT_NAMES:
                    script = client.register_script(script_source(name))
                    await client.script_load(script.script)
                    scripts[name] = script
        except BaseException:
            await client.aclose()
            raise
        self._scripts = scripts
        self._client = client

    async def persistence(self) -> Persistence:
        """What the server says about keeping acknowledged writes (see :mod:`.persistence`)."""
        if self._client is None:
            raise StorageError("persistence", "the Redis adapter is not initialized")
        with self._translated("persistence"):
            return await read_persistence(self._client)

    async def close(self) -> None:
        """Close listeners and the connection pool. Safe twice."""
        if self._closed:
            return
        self._closed = True
        for pubsub in list(self._pubsubs):
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # ends that listen_for_work loop (it sees _closed)
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(*_driver_errors()):
                await client.aclose()

    async def listen_for_work(self, on_work: Callable[[], None]) -> None:
        """Call ``on_work`` for each work notification until cancelled (``WorkNotifier``)."""
        if self._closed:
            raise StorageError("listen_for_work", "the Redis adapter is closed")
        await listen(
            self._make_client,
            self.channel,
            on_work,
            stopped=lambda: self._closed,
            pubsubs=self._pubsubs,
            probe_after_s=self.listen_timeout_s,
            backoff_initial_s=self.reconnect_initial_s,
            backoff_max_s=self.reconnect_max_s,
        )

    async def now(self) -> int:
        """The server's current time in epoch milliseconds (or the test clock's)."""
        return int(await self._run("now", "now"))

    # -- runs -------------------------------------------------------------------------

    async def create_run(self, run: WorkflowRun) -> CreateRunResult:
        """Store a pending run; an existing idempotency key returns that run instead."""
        check_run(run)
        fields = run_fields(run)
        claimable = RunStatus(run.status) is RunStatus.PENDING
        reply = await self._run(
            "create_run",
            "create_run",
            run.id,
            run.workflow,
            run.idempotency_key or "",
            "1" if claimable else "0",
            *fields,
        )
        if int(reply[0]) < 0:
            raise StorageError(
                "create_run", f"a run with id {run.id!r} already exists; run ids must be unique"
            )
        return CreateRunResult(to_run(to_hash(reply[1])), created=int(reply[0]) == 1)

    async def get_run(self, run_id: str) -> WorkflowRun | None:
        """The run, or ``None``."""
        check_identifier(run_id, "run id")
        flat = await self._run("get_run", "get_run", run_id)
        return to_run(to_hash(flat)) if flat else None

    async def list_runs(self, filter: RunFilter) -> list[WorkflowRun]:
        """Newest first by ``(created_at, id)``, filtered, keyset-paged (exactly)."""
        if filter.workflow is not None:
            check_identifier(filter.workflow, "workflow name")
        if filter.before_id is not None:
            check_identifier(filter.before_id, "run id")
        if filter.limit <= 0:
            return []
        status = None if filter.status is None else RunStatus(filter.status)
        rows = await self._run(
            "list_runs",
            "list_runs",
            list_index(status, filter.workflow),
            list_bound(filter.before, filter.before_id),
            filter.limit,
        )
        return [to_run(to_hash(flat)) for flat in rows]

    async def claim_next_run(
        self,
        workflow_names: Collection[str],
        *,
        lease_ms: int,
        holder: LeaseHolder | None = None,
    ) -> ClaimedRun | None:
        """Claim the oldest claimable run (one script); staleness is
        ``lease_expires_at <= now`` on the server's clock."""
        claimed = await self._claim("claim_next_run", workflow_names, lease_ms, holder, 1)
        return claimed[0] if claimed else None

    async def claim_runs(
        self,
        workflow_names: Collection[str],
        *,
        lease_ms: int,
        holder: LeaseHolder | None = None,
        limit: int,
    ) -> list[ClaimedRun]:
        """Claim up to ``limit`` runs, oldest first, in one script (one atomic batch)."""
        check_limit(limit, "claim_runs")
        return await self._claim("claim_runs", workflow_names, lease_ms, holder, limit)

    async def _claim(
        self,
        operation: str,
        workflow_names: Collection[str],
        lease_ms: int,
        holder: LeaseHolder | None,
        limit: int,
    ) -> list[ClaimedRun]:
        check_names(workflow_names)
        check_holder(holder)
        names = list(dict.fromkeys(workflow_names))
        if not names:
            return []
        lease_ids = [str(uuid.uuid4()) for _ in range(limit)]
        reply = await self._run(
            operation,
            "claim_runs",
            lease_ms,
            dump_holder(holder),
            limit,
            *lease_ids,
            *names,
        )
        return [ClaimedRun(to_run(to_hash(flat)), lease.decode()) for lease, flat in reply[1:]]

    async def _held_write(self, operation: str, run_id: str, lease_id: str, *args: Any) -> bool:
        check_identifier(run_id, "run id")
        if not is_identifier(lease_id):
            return False  # never issued, so never held
        return int(await self._run(operation, operation, run_id, lease_id, *args)) == 1

    async def heartbeat_run(self, run_id: str, lease_id: str) -> bool:
        """Renew a held lease by its stored length, from the server's now."""
        return await self._held_write("heartbeat_run", run_id, lease_id)

    async def sleep_run(self, run_id: str, lease_id: str, wake_at: int) -> bool:
        """Held run to sleeping; notifies so idle workers recompute their next wake time."""
        return await self._held_write("sleep_run", run_id, lease_id, int(wake_at))

    async def wait_run(
        self, run_id: str, lease_id: str, event_name: str, wake_at: int | None
    ) -> bool:
        """Held run to waiting, or straight to pending if a matching event is buffered."""
        check_identifier(event_name, "event name")
        deadline = "" if wake_at is None else int(wake_at)
        return await self._held_write("wait_run", run_id, lease_id, event_name, deadline)

    async def update_run_status(
        self,
        run_id: str,
        status: RunStatus,
        *,
        expected: Collection[RunStatus] | None = None,
    ) -> bool:
        """Set a status without a lease check; ``expected`` makes it conditional, atomically."""
        check_identifier(run_id, "run id")
        value = RunStatus(status).value
        guard = [] if expected is None else ["1", *(RunStatus(s).value for s in expected)]
        if not guard:
            guard = ["0"]
        reply = await self._run("update_run_status", "update_run_status", run_id, value, *guard)
        return int(reply) == 1

    async def update_claimed_run_status(
        self,
        run_id: str,
        lease_id: str,
        status: RunStatus,
        *,
        output: Any = None,
        error: ErrorInfo | None = None,
    ) -> bool:
        """Set a held run's status with its output and error; releases unless running."""
        value = RunStatus(status).value
        encoded_output, encoded_error = dump_value(output), dump_error(error)
        return await self._held_write(
            "update_claimed_run_status", run_id, lease_id, value, encoded_output, encoded_error
        )

    async def requeue_run(self, run_id: str) -> bool:
        """A failed or cancelled run back to pending, dropping only its failed steps."""
        check_identifier(run_id, "run id")
        return int(await self._run("requeue_run", "requeue_run", run_id)) == 1

    async def purge_runs(
        self,
        *,
        finished_before: int,
        limit: int,
        statuses: Collection[RunStatus] | None = None,
    ) -> int:
        """Delete up to ``limit`` finished runs updated before the cutoff, oldest first by
        ``(updated_at, id)``, with their steps, events and keys (one script)."""
        chosen = check_purge_args(finished_before, limit, statuses)
        if not chosen:
            return 0
        ordered = sorted(s.value for s in chosen)
        reply = await self._run("purge_runs", "purge_runs", int(finished_before), limit, *ordered)
        return int(reply)

    # -- steps ------------------------------------------------------------------------

    def _clash(self, operation: str, reply: Sequence[bytes], step: StepResult) -> StorageError:
        owner_run, owner_name, owner_id = (part.decode() for part in reply[1:4])
        if owner_id == step.id:
            where = f"step id {step.id!r} already belongs to run {owner_run!r}, step {owner_name!r}"
        else:
            where = f"run {owner_run!r}, step {owner_name!r} already has step id {owner_id!r}"
        return StorageError(
            operation,
            f"{where}; it cannot be reused for run {step.run_id!r}, step {step.name!r} "
            f"(id {step.id!r})",
        )

    async def save_step_result(self, result: StepResult, lease_id: str | None = None) -> bool:
        """Upsert a step row by id; lease-checked in the same script when given. A stored
        final row is never overwritten: ``False``."""
        check_step(result)
        if lease_id is not None and not is_identifier(lease_id):
            return False  # never issued, so never held
        reply = await self._run(
            "save_step_result",
            "save_step_result",
            result.id,
            result.run_id,
            result.name,
            lease_id or "",
            *step_fields(result),
        )
        if isinstance(reply, list):
            raise self._clash("save_step_result", reply, result)
        return int(reply) == 1

    async def get_step_results(self, run_id: str) -> list[StepResult]:
        """The run's steps by ``(created_at, id)`` (code point order)."""
        check_identifier(run_id, "run id")
        rows = await self._run("get_step_results", "get_step_results", run_id)
        steps = [to_step(to_hash(flat)) for flat in rows]
        return sorted(steps, key=lambda s: (s.created_at, s.id))

    # -- events -----------------------------------------------------------------------

    async def deliver_event(
        self, run_id: str, event_name: str, payload: Any, *, key: str | None = None
    ) -> bool:
        """Buffer an event for a run that has not ended and wake it if it waits for that
        name, in one script; a repeated ``key`` stores nothing and answers ``True``."""
        check_identifier(run_id, "run id")
        check_identifier(event_name, "event name")
        if key is not None:
            check_identifier(key, "event key")
        encoded = dump_value(payload)
        reply = await self._run(
            "deliver_event", "deliver_event", run_id, event_name, encoded, key or ""
        )
        return int(reply) == 1

    async def take_event(self, run_id: str, event_name: str) -> EventRecord | None:
        """Remove and return the oldest buffered event of that name."""
        check_identifier(run_id, "run id")
        check_identifier(event_name, "event name")
        raw = await self._run("take_event", "take_event", run_id, event_name)
        return None if raw is None else to_event(raw)

    async def consume_event(
        self, event_name: str, checkpoint: StepResult, lease_id: str
    ) -> ConsumeResult:
        """Take the oldest event and checkpoint its payload, in one script."""
        check_identifier(event_name, "event name")
        check_step(checkpoint)
        if not is_identifier(lease_id):
            return ConsumeResult(held=False)  # never issued, so never held
        reply = await self._run(
            "consume_event",
            "consume_event",
            checkpoint.run_id,
            lease_id,
            event_name,
            checkpoint.id,
            checkpoint.name,
            *step_fields(checkpoint, with_output=False),
        )
        if isinstance(reply[0], bytes) and reply[0] == b"clash":
            raise self._clash("consume_event", reply, checkpoint)
        if int(reply[0]) == 0:
            return ConsumeResult(held=False)
        if len(reply) == 1:
            return ConsumeResult(held=True)
        return ConsumeResult(held=True, event=to_event(reply[1]))

    # -- schedules --------------------------------------------------------------------

    async def upsert_schedule(self, schedule: Schedule) -> Schedule:
        """Insert or update by key, keeping created_at and (same recurrence) next_run_at."""
        check_schedule(schedule)
        flat = await self._run(
            "upsert_schedule",
            "upsert_schedule",
            schedule.key,
            schedule.workflow,
            dump_value(schedule.input),
            dump_recurrence(schedule.recurrence),
            schedule.next_run_at,
            schedule.created_at,
            schedule.updated_at,
        )
        return to_schedule(schedule.key, to_hash(flat))

    async def claim_due_schedule(self, workflow_names: Collection[str]) -> ClaimedSchedule | None:
        """Find the earliest due schedule by the server's now, then advance it from that
        now with a script guarded on the old ``next_run_at``; retry if another worker
        advanced it first."""
        check_names(workflow_names)
        names = list(dict.fromkeys(workflow_names))
        if not names:
            return None
        for _ in range(_SCHEDULE_RACE_RETRIES):
            reply = await self._run("claim_due_schedule", "due_schedule", *names)
            if len(reply) == 1:
                return None
            now, key = int(reply[0]), reply[1].decode()
            due = to_schedule(key, to_hash(reply[2]))
            following = next_fire_time(due.recurrence, due.next_run_at, now)
            advanced = await self._run(
                "claim_due_schedule", "advance_schedule", key, due.next_run_at, following, now
            )
            if advanced:
                return ClaimedSchedule(to_schedule(key, to_hash(advanced)), due.next_run_at)
        return None  # others keep winning this occurrence: they fire it

    async def delete_schedule(self, key: str) -> bool:
        """Remove a schedule; ``False`` if none."""
        check_identifier(key, "schedule key", MAX_SCHEDULE_KEY_LENGTH)
        return int(await self._run("delete_schedule", "delete_schedule", key)) == 1

    async def list_schedules(self) -> list[Schedule]:
        """All schedules by key."""
        flat = await self._run("list_schedules", "list_schedules")
        return [to_schedule(flat[i].decode(), to_hash(flat[i + 1])) for i in range(0, len(flat), 2)]
