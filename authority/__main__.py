"""``python -m authority``: the same as the ``authority`` command."""

from authority.cli import main

main()
