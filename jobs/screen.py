"""`ray job submit` entry point for screening an archive of whole smear fields with a model bundle (what `leukray screen` does).

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/screen.py --config jobs/configs/slides-s3.yaml --model s3://BUCKET/runs/r1/model --data s3://BUCKET/slides --out s3://BUCKET/screens/s1
    python jobs/screen.py --model RUN/model --data DIR --out SCREEN      # the same on a laptop

Inside `ray job submit`, RAY_ADDRESS is set and the job attaches to the cluster; run directly,
it starts a local Ray. Flags are those of `leukray screen` (see `leukray screen --help`).
"""

import sys

from leukray.cli import main

if __name__ == "__main__":
    sys.exit(main(["screen", *sys.argv[1:]]))
