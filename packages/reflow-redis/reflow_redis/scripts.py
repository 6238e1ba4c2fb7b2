"""The Lua scripts in ``lua/``, each with ``lib.lua`` in front, loaded once per process.

Each script is sent with ``SCRIPT LOAD`` at :meth:`RedisStorage.initialize` and run with
``EVALSHA`` (redis-py's ``Script`` loads it again if the server forgot it, after a
restart or ``SCRIPT FLUSH``).
"""

from __future__ import annotations

import functools
from importlib import resources

__all__ = ["SCRIPT_NAMES", "script_source"]

SCRIPT_NAMES = (
    "advance_schedule",
    "claim_runs",
    "consume_event",
    "create_run",
    "delete_schedule",
    "deliver_event",
    "due_schedule",
    "get_run",
    "get_step_results",
    "heartbeat_run",
    "list_runs",
    "list_schedules",
    "now",
    "purge_runs",
    "requeue_run",
    "save_step_result",
    "sleep_run",
    "take_event",
    "update_claimed_run_status",
    "update_run_status",
    "upsert_schedule",
    "wait_run",
)


def _read(name: str) -> str:
    return resources.files("reflow_redis").joinpath("lua", f"{name}.lua").read_text("utf-8")


@functools.cache
def script_source(name: str) -> str:
    """The full source sent to Redis for script ``name``: lib.lua, then the script."""
    if name not in SCRIPT_NAMES:
        raise KeyError(name)
    return f"{_read('lib')}\n-- ---- {name}.lua ----\n{_read(name)}"
