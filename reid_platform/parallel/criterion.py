"""The training loss of one rank, the one way to it: the class-level margin loss over the sharded
classifier, plus the pair-wise loss when the config asks for one, both on the global batch gathered
once; and the classifier's update after the backward (``Criterion.step``).

Both keep the gradient contract of ``comm.gather_global_batch`` (every rank computes its share; the
gather's backward sums the shares and compensates DDP's average), so the backbone's gradient is the
gradient of the combined loss of the global batch, whatever the number of workers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from reid_platform.parallel.classifier import ShardedClassifier
from reid_platform.parallel.comm import all_reduce, gather_global_batch, world
from reid_platform.parallel.config import LossConfig
from reid_platform.parallel.pairwise import pairwise_share


@dataclass(frozen=True)
class Losses:
    total: torch.Tensor  # this rank's part, to back-propagate
    value: torch.Tensor  # the loss of the global batch (detached, the same on every rank), to report


class Criterion(nn.Module):
    """The losses of the global batch from this rank's part of it (``embeddings``, ``labels``).

    The classifier holds this process's shard (its rank and world size are the process group's):
    its rank also says which rows of the gathered batch are this rank's.
    """

    def __init__(self, classifier: ShardedClassifier, cfg: LossConfig):
        super().__init__()
        shard, group = (classifier.rank, classifier.world_size), world()
        if shard != group:  # the gather orders the global batch by the group's ranks
            raise ValueError(
                f"the classifier holds shard {shard[0]} of {shard[1]}, but this process is rank {group[0]} "
                f"of {group[1]} in the process group: build it from Partition.of_process_group"
            )
        self.classifier, self.cfg = classifier, cfg

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> Losses:
        batch, batch_labels = gather_global_batch(embeddings, labels)
        class_level = self.classifier(batch, batch_labels)  # already the global value
        pairwise = self.cfg.pairwise
        if pairwise is None:
            return Losses(class_level, class_level.detach())
        rank = self.classifier.rank
        anchors = slice(rank * embeddings.shape[0], (rank + 1) * embeddings.shape[0])
        share = pairwise.weight * pairwise_share(batch, batch_labels, anchors, pairwise)
        whole = share.detach().clone()
        all_reduce(whole)  # the shares of every rank: the global batch's pair-wise loss, for reporting
        return Losses(class_level + share, class_level.detach() + whole)

    def step(self, lr_factor: float = 1.0) -> None:
        """The classifier's update after the backward, at its optimizer's rate times ``lr_factor``."""
        self.classifier.step(lr_factor)
