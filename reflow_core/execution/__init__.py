"""Executing one claimed run: the replay loop (``run.py``) and one executor per unit kind.

``run.py`` walks the workflow's units in order, replaying checkpoints and dispatching
the rest to ``step.py`` (with ``attempts.py`` for retry and timeout), ``sleep.py``,
``wait.py`` and ``parallel.py``. Every write is lease-checked; a refused write raises
:class:`~reflow_core.errors.LeaseExpiredError` and the run is left to its new owner.
"""

from reflow_core.execution.active import ActiveRun, Runtime
from reflow_core.execution.run import RunExecution, step_id

__all__ = ["ActiveRun", "RunExecution", "Runtime", "step_id"]

# Importing the executor modules registers them with the replay loop.
from reflow_core.execution import parallel as _parallel  # noqa: F401
from reflow_core.execution import sleep as _sleep  # noqa: F401
from reflow_core.execution import step as _step  # noqa: F401
from reflow_core.execution import wait as _wait  # noqa: F401
