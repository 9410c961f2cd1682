"""`python -m tasks`: see tasks/cli.py."""
import sys

if __name__ == "__main__":
    from tasks.cli import main

    sys.exit(main())
