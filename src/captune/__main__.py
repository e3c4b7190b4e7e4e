"""python -m captune."""

import sys

from captune.cli import main

sys.exit(main())
