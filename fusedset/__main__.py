import sys

from fusedset.cli import main

sys.exit(main())
