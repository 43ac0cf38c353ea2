"""`ray job submit` entry point for applying a model bundle (what `leukray predict` does).

ray job submit --working-dir . -- python jobs/predict.py --model RUN/model --data s3://... --out preds.parquet
python jobs/predict.py --model RUN/model --data DIR --out preds.parquet   # on a laptop
"""

import sys

from leukray.cli import main

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]]))
