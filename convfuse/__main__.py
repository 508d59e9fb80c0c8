"""``python -m convfuse``: the same as the ``convfuse`` command."""

from convfuse.cli import main

if __name__ == "__main__":
    main()
