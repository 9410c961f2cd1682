"""`python -m tasks`: see tasks/cli.py."""
import os
import sys

if __name__ == "__main__":
    from tasks.mounts import is_network

    if sys.path and sys.path[0] == os.getcwd() and is_network(sys.path[0]):
        # `-m` put the current folder first: on a share, each module imported from here on
        # would look there first, a round trip each. Search it last (the runner does the same
        # for the run root); a task module there is still found.
        sys.path.append(sys.path.pop(0))
    from tasks.cli import main

    sys.exit(main())
