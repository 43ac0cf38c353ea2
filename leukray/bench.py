"""`python -m leukray.bench` (what `make bench` runs): kept at this name for the README and
scripts; the benchmark lives in `leukray.tools.bench`."""

import sys

from leukray.tools.bench import main

if __name__ == "__main__":
    sys.exit(main())
