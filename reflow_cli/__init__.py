"""The ``reflow`` command and the processes it starts: the application layer.

Nothing in :mod:`reflow_core` imports this package (tests/unit/test_architecture.py):
the engine is a library, and the operator's tools sit on top of its public API.

* :mod:`reflow_cli.app`: the click group (``reflow = "reflow_cli.app:main"``);
  ``python -m reflow_cli`` works like ``reflow``.
* :mod:`reflow_cli.commands`: one module per command family.
* :mod:`reflow_cli.explain`: why a run is where it is, in plain words (pure).
* :mod:`reflow_cli.db`: opening a store read-only, schema status and migration.
* :mod:`reflow_cli.worker`, :mod:`reflow_cli.demo`: worker processes and the demo.

click and rich come with the ``cli`` extra; :func:`reflow_cli.app.main` checks for them
first so a missing extra is one clear line instead of a traceback.
"""

from __future__ import annotations

__all__: list[str] = []
