import sys

from circuitdiff.cli import main

sys.exit(main())
