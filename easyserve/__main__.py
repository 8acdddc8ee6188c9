"""``python -m easyserve``: the ``easyserve`` command, where the script is not on PATH."""

from .cli import main

main()
