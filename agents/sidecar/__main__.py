"""``python -m agents.sidecar``: the same as the ``cp-agent`` command."""

from agents.sidecar import main

if __name__ == "__main__":
    main()
