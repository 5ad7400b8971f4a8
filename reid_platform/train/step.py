"""One optimisation step, the same code on CPU and GPU.

The device decides the fast path: on CUDA the backbone runs under bf16 autocast in channels-last
memory (tensor cores want NHWC); on CPU it stays fp32 and contiguous. The sharded classifier always
sees fp32 embeddings (or fp64 ones, in numerical tests): Circle's scale of 128 puts logits far outside what bf16 resolves, and the
distributed log-sum-exp must agree across ranks to the last bit of its max.

Nothing here imports Ray or the config, so the GPU benchmark runs this step on a machine without them.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from reid_platform.parallel.criterion import Criterion
from reid_platform.parallel.losses import compute_dtype
from reid_platform.train.config import Precision, autocast_precision

PHASES = ("input", "forward", "classifier", "backward", "optimizer")


@dataclass(frozen=True)
class StepSettings:
    """How a step runs on one device: autocast dtype (None = none), memory format, and the dtype of
    parameters and inputs (float32; float64 lets tests compare computations that sum in different
    orders, such as 1 and 3 ranks, with a tolerance that does not depend on the CPU's kernels)."""

    autocast_dtype: torch.dtype | None
    channels_last: bool
    dtype: torch.dtype = torch.float32

    @classmethod
    def for_device(
        cls, device: torch.device, precision: Precision, channels_last: bool, dtype: torch.dtype = torch.float32
    ) -> StepSettings:
        cuda = device.type == "cuda"
        if dtype != torch.float32:
            bf16 = False  # autocast would round a float64 check's activations to bf16
        else:
            native_bf16 = cuda and torch.cuda.is_bf16_supported(including_emulation=False)
            bf16 = autocast_precision(precision, native_bf16) == "bf16"
        return cls(torch.bfloat16 if bf16 else None, channels_last and cuda, dtype)

    def autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.to(self.dtype)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def prepare_images(self, images: torch.Tensor, device: torch.device) -> torch.Tensor:
        images = images.to(device, self.dtype, non_blocking=True)
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images


class PhaseTimer:
    """Seconds spent per phase of the steps (``PHASES``), for benchmarks.

    On CUDA it synchronises at every phase boundary, which costs throughput: only benchmarks use it.
    """

    def __init__(self, device: torch.device):
        self.seconds: dict[str, float] = defaultdict(float)
        self._cuda = device.type == "cuda"

    @contextlib.contextmanager
    def phase(self, name: str):
        if self._cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        yield
        if self._cuda:
            torch.cuda.synchronize()
        self.seconds[name] += time.perf_counter() - started

    def batches(self, batches):
        """``batches``, with the wait for each one counted as input time."""
        iterator = iter(batches)
        while True:
            with self.phase("input"):
                batch = next(iterator, None)
            if batch is None:
                return
            yield batch


def _phase(timer: PhaseTimer | None, name: str):
    return timer.phase(name) if timer else contextlib.nullcontext()


def train_step(
    model: torch.nn.Module,
    criterion: Criterion,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    lr_factor: float,
    settings: StepSettings,
    timer: PhaseTimer | None = None,
    frozen: Sequence[torch.nn.Parameter] = (),
) -> torch.Tensor:
    """Forward, backward and update of backbone and classifier; returns the global batch's loss (not
    synchronised). The classifier steps at its optimizer's rate times ``lr_factor`` (the schedule's;
    ``optimizer``'s rates are set by the caller). ``frozen`` parameters keep their values (their
    gradients are dropped).

    ``model`` may be wrapped in DDP: the criterion's gradient contract makes DDP's average of the
    backbone gradients the gradient of the global-batch loss.
    """
    device = next(model.parameters()).device
    with _phase(timer, "forward"), settings.autocast(device):
        embeddings = model(settings.prepare_images(images, device))
    with _phase(timer, "classifier"):
        losses = criterion(embeddings.to(compute_dtype(embeddings)), labels.to(device, non_blocking=True))
    with _phase(timer, "backward"):  # the classifier's backward, the backbone's and DDP's all-reduce
        optimizer.zero_grad(set_to_none=True)
        losses.total.backward()
    with _phase(timer, "optimizer"):
        for parameter in frozen:
            parameter.grad = None  # optimizers skip parameters without a gradient: no decay, no momentum
        optimizer.step()
        criterion.step(lr_factor)
    return losses.value
