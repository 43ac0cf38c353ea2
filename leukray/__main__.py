"""`python -m leukray` is the `leukray` command."""

import sys

from leukray.cli import main

sys.exit(main())
