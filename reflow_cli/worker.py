"""Worker processes for ``reflow worker``: load the app, run it, stop gracefully.

Everything here is plain functions and classes, usable without click (tests, bench)::

    from reflow_cli.worker import WorkerConfig, run

    exit_code = run(WorkerConfig("myapp.flows:workflows", storage="sqlite:///app.db"), processes=2)

``config.target`` is ``MODULE:ATTR`` naming an :class:`~reflow_core.Engine`, a
:class:`~reflow_core.Workflow`, a list of workflows, or a zero-argument callable returning
one of those. An engine cannot cross a process boundary, so every worker process imports
the target itself; with ``processes > 1`` the supervisor (``supervisor.py``) starts
``python -m reflow_cli.worker`` children, forwards SIGTERM/SIGINT to them, and restarts
one that crashes (with backoff).

A worker that cannot start (a bad target or option, an unusable storage: anything that
fails before its "worker ready" line) logs one line saying what failed and what to do,
and exits with :data:`CONFIG_EXIT` (2); ``--log-level debug`` adds the traceback. The
supervisor checks the same things once before it starts any child, and a child that
still exits 2 is not restarted: the fleet stops and exits 2.

Shutdown on SIGTERM or SIGINT: the engine stops claiming, running steps get ``grace``
seconds to finish, and then the runs still executing are stopped and their leases
released so another worker resumes them at once. An ``async`` step is interrupted at
once; a plain ``def`` step cannot be interrupted (it runs in a thread), so its run keeps
its lease, heartbeating, until the function returns, and only then is released: no
other worker starts the same step while it still runs here. ``grace`` is therefore how
long steps may *finish normally*, not a bound on how long shutdown takes. A second
signal exits immediately (leases then expire on their own).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import unquote, urlsplit, urlunsplit

from reflow_cli.supervisor import CONFIG_EXIT, Supervisor
from reflow_core.durations import to_seconds
from reflow_core.engine import Engine
from reflow_core.errors import (
    AdapterError,
    AdapterNotFoundError,
    ConfigError,
    DuplicateWorkflowError,
    ReflowError,
    StorageError,
)
from reflow_core.events import RunCompleted, RunFailed, RunStarted, StepCompleted
from reflow_core.hookspecs import hookimpl
from reflow_core.lease import LeaseOptions
from reflow_core.migrations import MigratableStorage, SchemaNotCurrentError
from reflow_core.registry import plugin_manager
from reflow_core.storage import StorageAdapter
from reflow_core.waits import wait_set
from reflow_core.workflow import Workflow

__all__ = [
    "CONFIG_EXIT",
    "RunLogger",
    "StartupError",
    "Supervisor",
    "WorkerConfig",
    "build_engine",
    "check_options",
    "load_target",
    "run",
    "start_engine",
]

log = logging.getLogger("reflow.worker")


class StartupError(Exception):
    """The worker cannot start: its target, an option or its storage is unusable.

    ``str()`` is the one line reported to the operator (what failed, for which storage
    URL with its password hidden, and what to do); the original error is ``__cause__``.
    Raised only before the worker is ready: a failure after that is a crash.
    """


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """What one worker process needs. ``None`` means "not given": the engine's default,
    or the setting of a target that is already an :class:`Engine`."""

    target: str
    storage: str | None = None
    concurrency: int | None = None
    lease: float | None = None
    poll: float | None = None
    grace: float = 30.0
    log_level: str = "INFO"
    migrate: bool = True
    """Apply pending schema migrations at start (``initialize()``); ``False`` refuses to
    start on a store that is not current, saying to run ``reflow db migrate``."""

    def argv(self) -> list[str]:
        """Arguments recreating this config in a child (``python -m reflow_cli.worker``)."""
        args = [self.target, "--grace", repr(self.grace), "--log-level", self.log_level]
        if not self.migrate:
            args.append("--no-migrate")
        for flag, value in (
            ("--storage", self.storage),
            ("--concurrency", self.concurrency),
            ("--lease", self.lease),
            ("--poll", self.poll),
        ):
            if value is not None:
                args += [flag, str(value)]
        return args


def load_target(spec: str) -> Engine | list[Workflow[Any]]:
    """Import ``MODULE:ATTR`` and return an engine or the workflows it names.

    The current directory is importable, as with ``python -m``, so ``reflow worker
    app:flows`` finds ``./app.py``. Raises :class:`ConfigError` saying what is wrong,
    also when importing the module or calling the factory raises.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"expected MODULE:ATTR (e.g. myapp.flows:workflows), got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        missing = getattr(exc, "name", None)
        if missing and (module_name == missing or module_name.startswith(f"{missing}.")):
            hint = (
                "run the worker from the directory that holds it, or add that directory "
                "to PYTHONPATH"
            )
        else:
            hint = "install what it imports, or fix the import"
        raise ConfigError(f"cannot import module {module_name!r}: {exc}; {hint}") from exc
    except Exception as exc:
        raise ConfigError(
            f"importing module {module_name!r} raised {type(exc).__name__}: {exc}; fix the "
            "module (--log-level debug shows the traceback)"
        ) from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(
                f"module {module_name!r} has no attribute {attr!r}; check the name after the colon"
            ) from None
    if callable(obj) and not isinstance(obj, Engine | Workflow | type):
        try:
            obj = obj()
        except ConfigError as exc:
            raise ConfigError(f"calling {spec}() failed: {exc}") from exc
        except Exception as exc:
            raise ConfigError(
                f"calling {spec}() raised {type(exc).__name__}: {exc}; it must be a "
                "zero-argument function returning an Engine or workflows"
            ) from exc
    if isinstance(obj, Engine):
        return obj
    if isinstance(obj, Workflow):
        return [obj]
    if isinstance(obj, list | tuple) and obj and all(isinstance(w, Workflow) for w in obj):
        return list(obj)
    raise ConfigError(
        f"{spec} is {type(obj).__name__}; expected an Engine, a Workflow, a list of "
        "Workflows, or a zero-argument function returning one of those"
    )


def check_options(config: WorkerConfig) -> None:
    """:class:`ConfigError` naming the command-line flag of an unusable numeric option.

    Checked before anything starts: ``--grace`` in particular is otherwise read only at
    shutdown, too late to refuse it.
    """
    if config.concurrency is not None and (
        isinstance(config.concurrency, bool)
        or not isinstance(config.concurrency, int)
        or config.concurrency < 1
    ):
        raise ConfigError(f"invalid --concurrency {config.concurrency!r}: must be an int >= 1")
    if config.lease is not None:
        to_seconds(config.lease, what="--lease", allow_zero=False)
        try:
            LeaseOptions(duration=config.lease)
        except ConfigError as exc:
            raise ConfigError(f"invalid --lease: {exc}") from None
    if config.poll is not None:
        to_seconds(config.poll, what="--poll", allow_zero=False)
    to_seconds(config.grace, what="--grace")


def build_engine(config: WorkerConfig) -> tuple[Engine, str]:
    """The engine one worker process runs, from ``config.target`` and its options, and a
    description of its storage for the log (a URL without its password).

    Does no I/O beyond importing the target; raises :class:`ConfigError` or
    :class:`~reflow_core.errors.AdapterError`. :func:`start_engine` also starts it and
    turns every failure into one :class:`StartupError` line.
    """
    check_options(config)
    target = load_target(config.target)
    url = _storage_url(config, target)
    engine = _make_engine(config, target, url)
    return engine, _describe_storage(engine, url)


def _storage_url(config: WorkerConfig, target: Engine | list[Workflow[Any]]) -> str | None:
    """The storage URL the worker opens, ``None`` for an engine target (it has its own)."""
    if isinstance(target, Engine):
        given = [
            flag
            for flag, value in (
                ("--storage", config.storage),
                ("--concurrency", config.concurrency),
                ("--lease", config.lease),
                ("--poll", config.poll),
            )
            if value is not None
        ]
        if given:
            raise ConfigError(
                f"{config.target} is an Engine, which already has its storage and settings; "
                f"drop {', '.join(given)} or point at the workflows instead"
            )
        return None
    storage = config.storage or os.environ.get("REFLOW_STORAGE")
    if not storage:
        raise ConfigError(
            f"{config.target} names workflows, so the worker needs a storage: pass "
            "--storage URL (e.g. sqlite:///reflow.db) or set REFLOW_STORAGE"
        )
    return storage


def _make_engine(
    config: WorkerConfig, target: Engine | list[Workflow[Any]], url: str | None
) -> Engine:
    if isinstance(target, Engine):
        return target
    assert url is not None
    return Engine(
        url,
        target,
        concurrency=10 if config.concurrency is None else config.concurrency,
        lease=None if config.lease is None else LeaseOptions(duration=config.lease),
        poll_interval=1.0 if config.poll is None else config.poll,
    )


def _describe_storage(engine: Engine, url: str | None) -> str:
    """The storage for a log line: its URL without the password, else its type."""
    url = url or getattr(engine.storage, "url", None)
    return redact(url) if url else type(engine.storage).__name__


async def start_engine(config: WorkerConfig, *, run: bool = True) -> tuple[Engine, str]:
    """Build the engine of ``config`` and start it; return it and its storage description.

    With ``run=False`` only initialize (create or migrate) its storage and close it
    again: the supervisor's check before it starts any child. Every failure, whatever
    its kind (a bad option or target, an unknown scheme, a missing driver, a server that
    refuses connections, a SQLite file that cannot be created, a schema that cannot be
    migrated), is one :class:`StartupError` whose text says what to do.
    """
    try:
        check_options(config)
        target = load_target(config.target)
        url = _storage_url(config, target)
    except ConfigError as exc:
        raise StartupError(_one_line(exc, config.storage)) from exc
    try:
        engine = _make_engine(config, target, url)
    except DuplicateWorkflowError as exc:
        raise StartupError(f"{config.target}: {_one_line(exc, url)}") from exc
    except Exception as exc:  # opening the storage: unknown scheme, missing driver, bad URL
        raise StartupError(_storage_failure(exc, url, url or "")) from exc
    where = _describe_storage(engine, url)
    try:
        if not config.migrate:
            await _require_current_schema(engine.storage)
        if run:
            await engine.start()
        else:
            await engine.storage.initialize()
    except Exception as exc:
        await _discard(engine)
        raise StartupError(
            _storage_failure(exc, url or getattr(engine.storage, "url", None), where)
        ) from exc
    if not run:
        await _discard(engine)
    return engine, where


async def _require_current_schema(storage: StorageAdapter) -> None:
    """``--no-migrate``: :class:`SchemaNotCurrentError` unless the schema is current, so
    the engine's ``initialize()`` that follows has nothing to apply."""
    if not isinstance(storage, MigratableStorage):
        return
    status = await storage.schema_status()
    if not status.up_to_date:
        # The log line shows the URL without its password, as every worker line does.
        raise SchemaNotCurrentError(status, redact(storage.url) if storage.url else None)


async def _discard(engine: Engine) -> None:
    """Stop an engine that will not run and close its storage; errors are beside the point."""
    try:
        await engine.stop()
        await engine.storage.close()
    except Exception:
        log.debug("closing the storage after a failed start raised", exc_info=True)


def _one_line(exc: BaseException, url: str | None = None) -> str:
    """The text of ``exc`` on one line, passwords hidden (:func:`_scrub`). Reflow's errors
    carry their own text; other errors are prefixed with their type."""
    text = str(exc).strip()
    if not isinstance(exc, ConfigError | AdapterError | StorageError):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return _scrub(re.sub(r"\s*\n\s*", " ", text), url)


def _scrub(text: str, url: str | None) -> str:
    """``text`` with ``url`` redacted, its password hidden wherever it appears (if not
    too short to be told from other text), and any ``password=...`` (a libpq DSN) too."""
    if url:
        text = text.replace(url, redact(url))
        password = urlsplit(url).password
        for secret in {password, unquote(password or "")}:
            if secret and len(secret) >= 4:
                text = text.replace(secret, "***")
    return re.sub(r"(?i)(password\s*=\s*)('[^']*'|[^\s'\";,]+)", r"\1***", text)


def _storage_failure(exc: BaseException, url: str | None, where: str) -> str:
    """One line: the storage ``where`` cannot be opened, why, and what to do."""
    line = f"cannot open storage {_scrub(where, url)}: {_one_line(exc, url)}"
    hint = _storage_hint(exc, url)
    return f"{line}; {hint}" if hint else line


_CONNECTION_ERRORS = ("OperationalError", "PoolTimeout", "ConnectionTimeout", "InterfaceError")


def _storage_hint(exc: BaseException, url: str | None) -> str:
    """What to do about a storage failure, where its own text does not already say."""
    if isinstance(exc, AdapterNotFoundError):
        return "fix the URL's scheme, or install the package that provides its adapter"
    if isinstance(exc, ConfigError | AdapterError):
        return ""  # their text names the fix (the extra to install, the URL form)
    if not isinstance(exc, StorageError):
        return "--log-level debug shows the traceback"
    cause = exc.__cause__
    if cause is None:
        return ""  # raised by the adapter itself, which says why (e.g. a newer schema)
    parts = urlsplit(url or "")
    if parts.scheme.split("+")[0].lower() in ("sqlite", "apsw"):
        return _sqlite_hint(parts.path)
    if isinstance(cause, OSError) or type(cause).__name__ in _CONNECTION_ERRORS:
        return (
            "check that the database server is running and reachable from here, and the "
            "URL's host, port, user, password and database name"
        )
    return "check that the URL's user may create and change tables in that database"


def _sqlite_hint(url_path: str) -> str:
    if url_path in ("", "/", "/:memory:"):
        return ""
    path = Path(unquote(url_path[1:]))
    folder = path.parent
    if not folder.is_dir():
        return f"directory {folder} does not exist: create it, or fix the path in the URL"
    if path.is_dir():
        return f"{path} is a directory: give the path of a database file"
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        return f"{path} is not readable and writable by this user"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"directory {folder} is not writable by this user (SQLite writes files there)"
    return f"check that {path} is a Reflow SQLite database this user can read and write"


def redact(url: str) -> str:
    """``url`` without its password, fit for a log line."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


class RunLogger:
    """Engine hooks writing one operator-readable line per run start, completion, failure.

    Registered as a process-wide plugin, so it also observes an engine the user built.
    """

    def __init__(self) -> None:
        self._started: dict[str, float] = {}

    def _took(self, run_id: str) -> str:
        began = self._started.pop(run_id, None)
        return "?" if began is None else f"{time.monotonic() - began:.2f}s"

    @hookimpl
    def reflow_run_started(self, event: RunStarted) -> None:
        """Log a claim; a claim after the first is a resumption."""
        self._started[event.run_id] = time.monotonic()
        if event.attempt > 1:
            log.info("run %s (%s) resumed, claim #%d", event.run_id, event.workflow, event.attempt)
        else:
            log.info("run %s (%s) started", event.run_id, event.workflow)

    @hookimpl
    def reflow_step_completed(self, event: StepCompleted) -> None:
        """Steps at debug level: operators usually want runs, not steps."""
        log.debug(
            "run %s (%s) step %s completed (attempts: %d)",
            event.run_id,
            event.workflow,
            event.step,
            event.attempts,
        )

    @hookimpl
    def reflow_run_completed(self, event: RunCompleted) -> None:
        """Log a completion with its duration in this process."""
        log.info(
            "run %s (%s) completed in %s", event.run_id, event.workflow, self._took(event.run_id)
        )

    @hookimpl
    def reflow_run_failed(self, event: RunFailed) -> None:
        """The engine logs the failure itself (logger ``reflow.runs``): only the
        duration is added here, at debug level, so a failure is not logged twice."""
        log.debug(
            "run %s (%s) failed after %s", event.run_id, event.workflow, self._took(event.run_id)
        )


async def serve(config: WorkerConfig, *, supervisor_pid: int | None = None) -> int:
    """Run one worker in this process until SIGTERM/SIGINT; return the exit code.

    Raises :class:`StartupError` if the worker cannot start. Once it is ready (the
    "worker ready" line), an error is a crash and propagates as itself.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():
            log.warning("%s again: exiting now; leases of running runs expire by themselves", name)
            os._exit(1)
        log.info(
            "%s: stop claiming; running steps get %gs to finish, then their leases are "
            "released (a def step still running keeps its lease until it returns; signal "
            "again to exit at once)",
            name,
            config.grace,
        )
        stop.set()

    # Under a supervisor, Ctrl-C reaches the whole process group: ignore SIGINT here and
    # let the supervisor forward one SIGTERM, so one keypress is not taken as two signals.
    if supervisor_pid is not None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    handled = (signal.SIGTERM,) if supervisor_pid is not None else (signal.SIGTERM, signal.SIGINT)
    for signum in handled:
        loop.add_signal_handler(signum, on_signal, signum)
    hooks = RunLogger()
    hooks_name = f"reflow-worker-log-{id(hooks)}"
    try:
        try:
            # Registered before the engine starts, which collects the plugins' hooks.
            plugin_manager().register(hooks, name=hooks_name)
        except ReflowError as exc:
            raise StartupError(_one_line(exc, config.storage)) from exc
        engine, storage = await start_engine(config)
        try:
            log.info(
                "worker ready: workflows %s; storage %s; concurrency %d; lease %gs; poll %gs",
                ", ".join(engine.workflows),
                storage,
                engine.concurrency,
                engine.lease.duration_s,
                engine.poll_interval,
            )
            while not stop.is_set():
                # Polling the parent pid is how an orphan notices its supervisor was killed.
                if supervisor_pid is not None and os.getppid() != supervisor_pid:
                    log.warning("supervisor (pid %d) is gone; stopping", supervisor_pid)
                    break
                await wait_set(stop, 1.0)
            began = time.monotonic()
            await engine.stop(config.grace)
            log.info("worker stopped in %.2fs", time.monotonic() - began)
            return 0
        finally:
            await engine.stop()
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)
        with contextlib.suppress(ReflowError):
            if plugin_manager().get_plugin(hooks_name) is not None:
                plugin_manager().unregister(name=hooks_name)


def configure_logging(level: str) -> None:
    """Operator-readable lines on stderr: time, level, logger, pid, message."""
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s[%(process)d] %(message)s",
        stream=sys.stderr,
    )


def run(config: WorkerConfig, processes: int = 1) -> int:
    """Run a worker (``processes == 1``, in this process) or a supervised fleet; block
    until stopped by SIGTERM/SIGINT; return the exit code. Call from the main thread.

    A worker that cannot start logs one line saying why and what to do (with the
    traceback at log level DEBUG) and returns :data:`CONFIG_EXIT`. A fleet checks the
    target, the options and the storage (initializing it) once, here, before it starts
    any child.
    """
    configure_logging(config.log_level)
    try:
        if processes == 1:
            return asyncio.run(serve(config))
        try:
            asyncio.run(start_engine(config, run=False))
        except KeyboardInterrupt:
            log.warning("interrupted before any worker process started")
            return 130
        return Supervisor(config, processes).run()
    except StartupError as exc:
        return _cannot_start(exc)


def _cannot_start(exc: StartupError) -> int:
    log.error(
        "worker cannot start: %s", exc, exc_info=exc if log.isEnabledFor(logging.DEBUG) else None
    )
    return CONFIG_EXIT


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line, not the usage text: the supervisor wrote these arguments."""
        self.exit(CONFIG_EXIT, f"{self.prog}: invalid arguments: {message}\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of a supervised child: ``python -m reflow_cli.worker TARGET ...``."""
    parser = _ArgumentParser(prog="python -m reflow_cli.worker")
    parser.add_argument("target")
    parser.add_argument("--storage")
    parser.add_argument("--concurrency", type=int)
    parser.add_argument("--lease", type=float)
    parser.add_argument("--poll", type=float)
    parser.add_argument("--grace", type=float, default=30.0)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--no-migrate", dest="migrate", action="store_false")
    parser.add_argument("--supervisor-pid", type=int)
    args = parser.parse_args(argv)
    config = WorkerConfig(
        target=args.target,
        storage=args.storage,
        concurrency=args.concurrency,
        lease=args.lease,
        poll=args.poll,
        grace=args.grace,
        log_level=args.log_level,
        migrate=args.migrate,
    )
    configure_logging(config.log_level)
    try:
        return asyncio.run(serve(config, supervisor_pid=args.supervisor_pid))
    except StartupError as exc:
        return _cannot_start(exc)


if __name__ == "__main__":
    sys.exit(main())
