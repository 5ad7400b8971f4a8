"""Where a backbone's pretrained weights come from: ``model.pretrained: none | imagenet | PATH``.

``imagenet`` means the architecture's recommended ImageNet weights: torchvision's ``DEFAULT`` weights
enum for the ResNets (IBN-a variants start from their plain ResNet's), timm's default pretrained tag
for ``timm/NAME``. They live in the libraries' own caches: ``$TORCH_HOME/hub/checkpoints/`` (torch's
hub cache, ``~/.cache/torch`` by default) and the Hugging Face hub cache (``$HF_HUB_CACHE``,
``~/.cache/huggingface/hub``).

The driver resolves ``imagenet`` once, before any worker starts (``resolve``, downloading into the
cache when the machine is online), and hands the workers the local file; workers only read files
(``weights_file`` with ``download=False``), so a cluster never has every worker download at once.
On a cluster the caches belong on shared storage (set TORCH_HOME / HF_HUB_CACHE there), or pass the
file as a PATH. When the weights are neither cached nor downloadable, the error names the file to
place and where.
"""

from __future__ import annotations

import urllib.error
from pathlib import Path
from urllib.parse import urlparse

import torch

from reid_platform.errors import ModelFormatError
from reid_platform.model.config import ModelConfig

HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # what timm looks for on the hub, in order


def resolve(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with ``pretrained: imagenet`` replaced by the local file of those weights (downloaded
    into the library's cache when missing and the machine is online)."""
    if cfg.pretrained == "imagenet":
        return cfg.model_copy(update={"pretrained": str(weights_file(cfg, download=True))})
    return cfg


def weights_file(cfg: ModelConfig, download: bool) -> Path | None:
    """The local file of ``cfg.pretrained`` (None for ``none``), downloaded only if ``download``."""
    if cfg.pretrained == "none":
        return None
    if cfg.pretrained != "imagenet":
        path = Path(cfg.pretrained)
        if not path.is_file():
            raise ModelFormatError(f"model.pretrained: {path} is not a file (none, imagenet or a state dict's path)")
        return path
    if cfg.timm_name:
        return _timm_file(cfg.timm_name, download)
    import torchvision

    url = torchvision.models.get_model_weights(cfg.arch.removesuffix("_ibn_a")).DEFAULT.url
    return _hub_file(url, download, f"{cfg.arch}'s ImageNet weights (torchvision)")


def _hub_file(url: str, download: bool, what: str) -> Path:
    """torch's hub cache file of ``url``, as ``torch.hub.load_state_dict_from_url`` keeps it."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    if path.is_file():
        return path
    if download:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(path), progress=False)
            return path
        except (urllib.error.URLError, OSError) as error:
            reason = f"cannot be downloaded ({error})"
    else:
        reason = "are not in the cache (workers never download)"
    raise ModelFormatError(f"model.pretrained imagenet: {what} {reason}; place {url} at {path}")


def _timm_file(name: str, download: bool) -> Path:
    import huggingface_hub
    import timm.models

    source = timm.models.get_pretrained_cfg(name)
    if source is None or not (source.hf_hub_id or source.url):
        raise ModelFormatError(f"model.pretrained imagenet: timm/{name} has no pretrained weights")
    if not source.hf_hub_id:
        return _hub_file(source.url, download, f"timm/{name}'s weights")
    for filename in HF_WEIGHTS:
        cached = huggingface_hub.try_to_load_from_cache(source.hf_hub_id, filename)
        if isinstance(cached, str):
            return Path(cached)
    reason = "are not in the Hugging Face cache (workers never download)"
    if download:
        try:
            return Path(huggingface_hub.hf_hub_download(source.hf_hub_id, HF_WEIGHTS[0]))
        except (huggingface_hub.errors.HfHubHTTPError, huggingface_hub.errors.LocalEntryNotFoundError, OSError) as error:
            reason = f"cannot be downloaded ({type(error).__name__})"
    cache = huggingface_hub.constants.HF_HUB_CACHE
    raise ModelFormatError(
        f"model.pretrained imagenet: timm/{name}'s weights {reason}; run "
        f"`huggingface-cli download {source.hf_hub_id} {HF_WEIGHTS[0]}` where it is online and copy {cache} "
        "(or pass the weights file as model.pretrained)"
    )
