"""`python -m oppu ...`: the `oppu` command without its console script."""

import sys

from .cli import main

sys.exit(main())
