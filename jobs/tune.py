"""`ray job submit` entry point for the classifier sweeps (Tables III/IV), model choice, bundle and report on a run folder (what `leukray tune` does).

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/tune.py --out s3://BUCKET/runs/r1
    python jobs/tune.py --out RUN      # the same on a laptop

Inside `ray job submit`, RAY_ADDRESS is set and the job attaches to the cluster; run directly,
it starts a local Ray. Flags are those of `leukray tune` (see `leukray tune --help`).
"""

import sys

from leukray.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
