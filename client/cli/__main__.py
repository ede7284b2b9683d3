"""``python -m client.cli ...``: the ``zkv`` command (how the tests start every process)."""

from client.cli import main

main()
