"""Ray job entrypoint: train one config.

    ray job submit --working-dir . -- python jobs/train.py configs/demo.yaml --set train.epochs=3

Inside a Ray job, ``ray.init()`` joins the job's cluster; run directly, it starts a local one.
"""

import sys

from reid_platform.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
