"""reid-platform: distributed person re-identification training.

Pipeline stages, in the order a tensor travels through them:
data (datasets, packing) -> input (DALI) -> model (backbone + embedding head)
-> parallel (sharded classifier + Circle loss) -> train (the Ray-free engine)
-> evaluation (mAP / CMC / mINP) -> tracking (MLflow); run (Ray Train and MLflow around the engine)
puts a training job together, planning sizes one before it starts. ``tests/layers.py`` holds the
packages' order.
"""

__version__ = "0.1.0"
