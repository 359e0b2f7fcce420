"""``python -m fusedres``: see fusedres.cli."""
import sys

from fusedres.cli import main

if __name__ == "__main__":
    sys.exit(main())
