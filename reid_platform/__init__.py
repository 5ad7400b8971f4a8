"""reid-platform: distributed person re-identification training.

Pipeline stages, in the order a tensor travels through them:
data (datasets, packing) -> input (DALI) -> model (backbone + embedding head)
-> parallel (sharded classifier + Circle loss) -> train (Ray Train loop)
-> evaluation (mAP / CMC / mINP) -> tracking (MLflow).
"""

__version__ = "0.1.0"
