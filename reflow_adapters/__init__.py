"""Reflow's built-in storage adapters.

Each sub-package registers itself through the ``reflow`` entry-point group exactly as a
third-party adapter would; nothing here is imported by ``reflow_core``. Import an
adapter class directly (``from reflow_adapters.sqlite import SQLiteStorage``) or open
one by URL with :func:`reflow_core.open_storage`.
"""
