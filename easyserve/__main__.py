"""``python -m easyserve``: the ``easyserve`` command, where the script is not on PATH."""

from .cli import main

if __name__ == "__main__":  # not when a tool imports the module (documentation, a test's collection)
    main()
