"""`ray job submit` entry point for training the smear-domain cell classifier from annotated smear fields (what `leukray smear-train` does).

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/smear_train.py --fields s3://BUCKET/ALL_IDB1/im --annotations s3://BUCKET/ALL_IDB1/xyc --out s3://BUCKET/smear/r1
    python jobs/smear_train.py --fields ALL_IDB1/im --annotations ALL_IDB1/xyc --out runs/smear   # the same on a laptop

The bundle it writes under OUT/model is what `jobs/screen.py --model` takes. Inside `ray job
submit`, RAY_ADDRESS is set and the job attaches to the cluster; run directly, it starts a local
Ray. Flags are those of `leukray smear-train` (see `leukray smear-train --help`).
"""

import sys

from leukray.cli import main

if __name__ == "__main__":
    sys.exit(main(["smear-train", *sys.argv[1:]]))
