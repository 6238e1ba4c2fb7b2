"""One module per command family; each exposes click commands that :mod:`reflow_cli.app`
adds to the ``reflow`` group. These modules import click at the top: only
:func:`reflow_cli.app.build_cli` imports them, after the ``cli`` extra was checked."""
