"""``python -m controlplane.server serve ...``: the ``controlplane`` command."""

from controlplane.server import main

if __name__ == "__main__":  # pragma: no cover
    main()
