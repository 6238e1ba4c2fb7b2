"""``python -m reflow_cli``: the same as the ``reflow`` command."""

from reflow_cli.app import main

main()
