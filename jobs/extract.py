"""`ray job submit` entry point for the first stage of the pipeline: discover, hash, split, preprocess and extract ResNet50 features (what `leukray extract` does).

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/extract.py --config jobs/configs/cnmc-s3.yaml --out s3://BUCKET/runs/r1
    python jobs/extract.py --data DIR --out RUN      # the same on a laptop

Inside `ray job submit`, RAY_ADDRESS is set and the job attaches to the cluster; run directly,
it starts a local Ray. Flags are those of `leukray extract` (see `leukray extract --help`).
"""

import sys

from leukray.cli import main

if __name__ == "__main__":
    sys.exit(main(["extract", *sys.argv[1:]]))
