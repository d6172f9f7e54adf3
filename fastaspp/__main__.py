import sys

from fastaspp.cli import main

sys.exit(main())
