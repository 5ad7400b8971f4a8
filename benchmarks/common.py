"""What the training benchmarks share: a packed synthetic set, the demo config at a global batch of
64, the engine on W gloo processes without Ray, and the plain PyTorch loop a user would write
instead of the platform (the baseline of ``train_step.py`` and ``recipes.py``)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reid_platform.config import RunConfig, load_config
from reid_platform.data.manifest import ShardDataset
from reid_platform.data.pack import PackOptions, pack_dataset
from reid_platform.data.shard_format import LABEL
from reid_platform.data.synth import write_synthetic_market1501
from reid_platform.parallel.losses import margin_logits
from reid_platform.train.step import PhaseTimer
from tests import DEMO_CONFIG
from tests.gloo import run_gloo

GLOBAL_BATCH = 64
ENGINE_TIMEOUT_S = 6 * 3600  # a recipe's whole training on 2 cores


def synthetic_shards(scratch: Path, identities: int, camera_strength: float = 1.0, seed: int = 0) -> Path:
    raw, shards = scratch / "raw", scratch / "shards"
    write_synthetic_market1501(raw, identities, 6, seed=seed, progress=False, camera_strength=camera_strength)
    pack_dataset([("market1501", raw)], shards, PackOptions(samples_per_shard=300), progress=False)
    return shards


def run_config(shards: Path, world_size: int, cores: int, overrides: list[str]) -> RunConfig:
    """The demo's config on ``world_size`` workers sharing ``cores``, at a global batch of 64."""
    settings = [
        f"data.shards={shards}", f"scaling.num_workers={world_size}", f"scaling.cpus_per_worker={cores / world_size}",
        f"input.batch_size={GLOBAL_BATCH // world_size}", *overrides,
    ]  # fmt: skip
    return load_config(DEMO_CONFIG, settings)


def on_engines(world_size: int, work, *args) -> list:
    """``work(rank, world_size, *args)`` on ``world_size`` new gloo processes (no Ray; the tests'
    harness); results by rank."""
    return run_gloo(world_size, work, *args, timeout_s=ENGINE_TIMEOUT_S, fresh=True)


class PlainLoop:
    """One process: torchvision's ResNet with last stride 1 and a BNNeck, a dense Circle classifier
    (cross-entropy on the Circle logits), Adam at 3.5e-4 without a schedule, and webdataset +
    torchvision transforms + a DataLoader worker (the platform's augmentation, shuffled batches)."""

    def __init__(self, cfg: RunConfig, cores: int, lr: float = 3.5e-4):
        import torchvision
        import webdataset as wds
        from torch import nn

        from reid_platform.input.torch_loader import _Decode, train_transform

        torch.set_num_threads(cores)
        torch.manual_seed(cfg.train.seed)
        self.cfg = cfg
        resnet = getattr(torchvision.models, cfg.model.arch)()
        resnet.layer4[0].conv1.stride = resnet.layer4[0].downsample[0].stride = (1, 1)
        neck = nn.BatchNorm1d(resnet.fc.in_features)
        neck.bias.requires_grad_(False)
        self.model = nn.Sequential(*list(resnet.children())[:-2], nn.AdaptiveAvgPool2d(1), nn.Flatten(), neck)
        self.dataset = ShardDataset.open(cfg.data.shards)
        self.classes = nn.Parameter(torch.randn(self.dataset.num_classes, resnet.fc.in_features) * 0.01)
        self.optimizer = torch.optim.Adam([*self.model.parameters(), self.classes], lr=lr)
        images = (
            wds.WebDataset(list(self.dataset.split("train").tars), resampled=True, shardshuffle=False, nodesplitter=None)
            .shuffle(cfg.input.shuffle_buffer)
            .map(_Decode(train_transform(cfg.input)))
        )
        self.batches = iter(torch.utils.data.DataLoader(images, batch_size=GLOBAL_BATCH, num_workers=1, drop_last=True))
        self.steps_per_epoch = self.dataset.split("train").samples // GLOBAL_BATCH
        self.timer = PhaseTimer(torch.device("cpu"))

    def step(self) -> float:
        with self.timer.phase("input"):
            images, meta = next(self.batches)
        labels = meta[:, LABEL]
        self.model.train()
        with self.timer.phase("forward"):
            embeddings = self.model(images)
        with self.timer.phase("classifier"):
            cosine = F.normalize(embeddings) @ F.normalize(self.classes).t()
            loss = F.cross_entropy(margin_logits(cosine, labels, self.cfg.loss), labels)
        with self.timer.phase("backward"):
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        with self.timer.phase("optimizer"):
            self.optimizer.step()
        return loss.item()

    def embedder(self):
        """The trained network with the interface the platform's evaluator calls (``embed``, ``feature_dim``)."""
        model = self.model

        class Embedder(torch.nn.Module):
            feature_dim = self.classes.shape[1]

            def __init__(self):
                super().__init__()
                self.inner = model

            @torch.no_grad()
            def embed(self, images, flip=False):
                features = self.inner(images)
                if flip:
                    features = features + self.inner(images.flip(-1))
                return F.normalize(features, dim=1)

        return Embedder()
