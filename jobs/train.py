"""`ray job submit` entry point for training the custom ResNet50 on a run folder that jobs/extract.py wrote (what `leukray train` does).

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/train.py --out s3://BUCKET/runs/r1 --train.epochs 50
    python jobs/train.py --out RUN      # the same on a laptop

Inside `ray job submit`, RAY_ADDRESS is set and the job attaches to the cluster; run directly,
it starts a local Ray. Flags are those of `leukray train` (see `leukray train --help`).
"""

import sys

from leukray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
