"""The ``evaluation`` section: how query and gallery are compared and ranked.

The same config drives the evaluation during training and ``reid eval``, whose flags are generated
from these fields (``--protocol``, ``--rerank-k1``, ...).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from reid_platform.section import Section

Metric = Literal["cosine", "euclidean"]
# "market": Market-1501, DukeMTMC-reID and MSMT17 (same id and same camera removed).
# "cuhk03": the old CUHK03 protocol (one gallery image per identity, repeated and averaged CMC).
# "no_camera": data without camera ids; every gallery image of the query's id is a true match.
Protocol = Literal["market", "cuhk03", "no_camera"]


class EvaluationConfig(Section):
    metric: Metric = "cosine"
    protocol: Protocol = Field(
        "market", description="market: also DukeMTMC-reID and MSMT17; cuhk03: old single-shot protocol; "
        "no_camera: data without camera ids."
    )
    memory_mb: float = Field(512.0, gt=0.0, description="Budget for one block of query x gallery ranking work.")
    flip: bool = Field(False, description="Average each image's embedding with its horizontal mirror's.")
    aqe_k: int = Field(
        0, ge=0, description="Average query expansion: each query becomes the mean of itself and its k nearest "
        "gallery images (0 is off)."
    )
    cuhk03_repeats: int = Field(10, ge=1, description="cuhk03 protocol: gallery draws averaged for CMC.")
    cuhk03_seed: int = Field(0, description="cuhk03 protocol: seed of the gallery draws.")
    rerank: bool = Field(False, description="k-reciprocal re-ranking (Zhong et al. 2017).")
    rerank_k1: int = Field(20, ge=1, description="re-ranking: k-reciprocal neighbours.")
    rerank_k2: int = Field(6, ge=1, description="re-ranking: neighbours of the local query expansion.")
    rerank_lambda: float = Field(0.3, ge=0.0, le=1.0, description="re-ranking: weight of the original distance.")

    @property
    def repeats(self) -> int:
        """Gallery draws per query: several under the CUHK03 protocol, else one."""
        return self.cuhk03_repeats if self.protocol == "cuhk03" else 1

    def block_rows(self, num_gallery: int) -> int:
        """Query rows whose float32 distances to the whole gallery fit ``memory_mb``."""
        return max(1, int(self.memory_mb * 2**20 // (4 * num_gallery)))
