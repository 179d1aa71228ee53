"""Train an RGNN on a Ray cluster: `ray job submit -- python cluster/train_coco.py [flags]`.

Builds or finds the shards (COCO, `--shards`, or the built-in synthetic set), runs the paper's 4
stages with Ray Train DDP and logs to MLflow (cluster/driver.py). `--help` lists every flag.
"""
from cluster.driver import main

if __name__ == "__main__":
    main()
