"""`ray job submit` entry point for the whole pipeline (what `leukray run` does).

    ray job submit --working-dir . -- python jobs/pipeline.py --config cfg.yaml --data s3://... --out s3://...
    python jobs/pipeline.py --data DIR --out RUN          # the same on a laptop

Inside `ray job submit`, RAY_ADDRESS is set and the job attaches to the cluster; run directly,
it starts a local Ray. Flags are those of `leukray run` (see `leukray run --help`).
"""

import sys

from leukray.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
