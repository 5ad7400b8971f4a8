"""Ray job entrypoint: a hyperparameter search (`reid tune`) of one config.

    ray job submit --working-dir . -- python jobs/tune.py configs/demo.yaml --space configs/space.yaml --trials 12

Inside a Ray job, ``ray.init()`` joins the job's cluster; run directly, it starts a local one.
`reid submit CONFIG --tune SPACE.yaml` submits it.
"""

import sys

from reid_platform.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
