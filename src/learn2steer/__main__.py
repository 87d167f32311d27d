"""``python -m learn2steer`` is the ``l2s`` command."""

from learn2steer.cli import main

main()
