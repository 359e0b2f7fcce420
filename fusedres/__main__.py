"""``python -m fusedres``: see fusedres.bench.cli."""
import sys

from fusedres.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
