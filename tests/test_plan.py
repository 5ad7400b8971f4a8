"""`reid plan` and its arithmetic (``planning/``) against the real objects: the classifier's
tensors, the backbones' parameters and saved activations, the collectives a step issues."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

from reid_platform.cli import main
from reid_platform.config import load_config
from reid_platform.data.manifest import Manifest
from reid_platform.model.backbone import ReIDNet
from reid_platform.model.backbone_memory import TABLE_PATH, BackboneProfile, load_profiles
from reid_platform.model.config import ModelConfig
from reid_platform.model.resnet import resnet_trunk
from reid_platform.parallel.classifier import ShardedClassifier, shard_range
from reid_platform.parallel.config import LossConfig, PairwiseConfig
from reid_platform.parallel.criterion import Criterion
from reid_platform.parallel.sync_batchnorm import convert_sync_batchnorm
from reid_platform.planning.capacity import (
    backbone_memory,
    backbone_parameters,
    classifier_memory,
    max_classes,
    plan,
    step_transfers,
    trainable_parameters,
)
from reid_platform.planning.workload import Workload
from reid_platform.train.config import TrainConfig
from reid_platform.train.optimizers import classifier_optimizer
from tests import DEMO_CONFIG, REPO
from tests.gloo import run_gloo

PROFILES = load_profiles()
CLASSES, DIM, BATCH = 23, 8, 4


def measurement_script():
    """benchmarks/backbone_memory.py, the method the table was made with."""
    spec = importlib.util.spec_from_file_location("backbone_memory", REPO / "benchmarks/backbone_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def classifier_workload(workers: int, sample_rate: float, optimizer: str) -> Workload:
    return Workload(
        classes=CLASSES, workers=workers, batch=BATCH, sample_rate=sample_rate,
        train=TrainConfig(optimizer=optimizer),
    )  # fmt: skip


def tensor_bytes(tensors) -> int:
    return sum(tensor.nbytes for tensor in tensors)


# -- the classifier: the planner's bytes are the tensors' ---------------------------------------


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("sample_rate", [1.0, 0.5])
@pytest.mark.parametrize("workers", [1, 2])
def test_classifier_bytes_are_those_of_a_real_shard_after_a_step(workers, sample_rate, optimizer):
    workload = classifier_workload(workers, sample_rate, optimizer)
    predicted = classifier_memory(workload, DIM)
    # rank 0 of W, in one process: the largest shard, the whole global batch as its input
    classifier = ShardedClassifier(
        CLASSES, DIM, 0, workers, LossConfig(sample_rate=sample_rate), classifier_optimizer(TrainConfig(optimizer=optimizer))
    )  # fmt: skip
    start, end = shard_range(CLASSES, 0, workers)
    assert predicted.weights == (end - start) * DIM * 4
    # distinct classes spread over all of them, as the planner counts the classes a shard sees
    labels = torch.arange(workload.global_batch) * 3 % CLASSES
    embeddings = torch.randn(workload.global_batch, DIM, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = classifier(embeddings, labels)
    loss.backward()
    rows, active = classifier._active
    assert active.grad.nbytes == predicted.active_gradient
    assert (active.nbytes + rows.nbytes if rows is not None else 0) == predicted.active_rows
    logits = [t for t in saved if t.shape == (workload.global_batch, active.shape[0])]
    assert logits[0].nbytes == predicted.logits
    classifier.step()
    held = tensor_bytes([*classifier.parameters(), *classifier.buffers()])
    assert held == predicted.weights + predicted.optimizer_state
    assert predicted.weights == tensor_bytes(classifier.parameters())


# -- the backbone: parameters and activations ----------------------------------------------------


@pytest.mark.parametrize("arch", sorted(PROFILES))
def test_the_table_has_each_trunks_parameters_width_and_batchnorms(arch):
    trunk, width = resnet_trunk(arch, last_stride=1)
    norms = [m for m in trunk.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    profile = PROFILES[arch]
    assert profile.trunk_parameters == sum(p.numel() for p in trunk.parameters())
    assert (profile.width, profile.batchnorm_layers) == (width, len(norms))
    assert profile.batchnorm_channels == sum(norm.num_features for norm in norms)


@pytest.mark.parametrize("embedding_dim, pooling", [(None, "avg"), (128, "gem")])
def test_backbone_parameters_are_the_networks(embedding_dim, pooling):
    network = ReIDNet(ModelConfig(arch="resnet18", embedding_dim=embedding_dim, pooling=pooling))
    workload = Workload(
        classes=10, workers=1, batch=2, arch="resnet18", embedding_dim=embedding_dim, gem=pooling == "gem"
    )
    profile = PROFILES["resnet18"]
    assert backbone_parameters(workload, profile) == sum(p.numel() for p in network.parameters())
    assert trainable_parameters(workload, profile) == sum(
        p.numel() for p in network.parameters() if p.requires_grad
    )


@pytest.mark.parametrize("last_stride", [1, 2])
def test_activations_scale_from_the_reference_to_another_batch_and_size(last_stride):
    script = measurement_script()
    size, batch = (96, 48), 3  # the table's reference is 256x128 at 2 and 4 images
    assert size != script.REFERENCE
    measured = script.saved_bytes(script.network("resnet18", last_stride, size), batch, size)
    workload = Workload(classes=10, workers=1, batch=batch, arch="resnet18", height=size[0], width=size[1],
                        precision="fp32", last_stride=last_stride)  # fmt: skip
    predicted = backbone_memory(workload, PROFILES["resnet18"]).activations
    assert abs(predicted - measured) <= 0.15 * measured


# -- the collectives: what a step sends -----------------------------------------------------------

# a Linear "trunk" whose BNNeck is the BatchNorm of the step below
LINEAR = BackboneProfile("linear", DIM * DIM + DIM, DIM, 0, 0, {1: 0.0}, {1: 0})


def collectives_of_a_step(rank, world_size, pairwise):
    """Bytes each collective of one step sends from this rank (ring all-reduce, all-gather), DDP's
    gradient all-reduce aside: it runs in C++, below ``torch.distributed``'s Python functions."""
    sent = []
    gather, reduce = dist.all_gather_single, dist.all_reduce

    def all_gather_single(output, tensor, *args, **kwargs):
        sent.append((world_size - 1) * tensor.nbytes)
        return gather(output, tensor, *args, **kwargs)

    def all_reduce(tensor, *args, **kwargs):
        sent.append(round(2 * (world_size - 1) / world_size * tensor.nbytes))
        return reduce(tensor, *args, **kwargs)

    torch.manual_seed(0)
    backbone = convert_sync_batchnorm(
        torch.nn.Sequential(torch.nn.Linear(DIM, DIM), torch.nn.BatchNorm1d(DIM))
    )
    model = torch.nn.parallel.DistributedDataParallel(backbone)
    cfg = LossConfig(pairwise=PairwiseConfig(name="triplet") if pairwise else None)
    criterion = Criterion(ShardedClassifier(CLASSES, DIM, rank, world_size, cfg), cfg)
    inputs, labels = torch.randn(BATCH, DIM), torch.tensor([0, 0, 1, 1]) + 2 * rank
    dist.all_gather_single, dist.all_reduce = all_gather_single, all_reduce
    try:
        criterion(model(inputs), labels).total.backward()
    finally:
        dist.all_gather_single, dist.all_reduce = gather, reduce
    return sent


@pytest.mark.parametrize("pairwise", [False, True])
def test_the_planned_transfers_are_the_collectives_a_step_issues(pairwise):
    workload = Workload(
        classes=CLASSES, workers=2, batch=BATCH, precision="fp32", sync_bn=True, pairwise=pairwise
    )
    planned = [
        t.bytes for t in step_transfers(workload, LINEAR) if not t.name.startswith("backbone gradients")
    ]
    for sent in run_gloo(2, collectives_of_a_step, pairwise):
        assert sum(sent) == sum(planned)
    assert step_transfers(replace(workload, workers=1), LINEAR) == ()


# -- the largest class count -------------------------------------------------------------------


def test_max_classes_is_the_last_count_that_fits():
    workload = Workload(
        classes=1000, workers=4, batch=32, sample_rate=0.2, arch="resnet18", height=128, width=64
    )
    profile, memory = PROFILES["resnet18"], 6 * 1024**3
    most = max_classes(workload, profile, memory)
    assert plan(replace(workload, classes=most), profile).total <= memory
    assert plan(replace(workload, classes=most + 1), profile).total > memory
    assert max_classes(workload, profile, 1024**2) == 0  # not even the backbone fits
    # the runtime counts against the memory: without it more classes fit
    assert max_classes(replace(workload, runtime_bytes=0), profile, memory) > most


# -- the command line ----------------------------------------------------------------------------

FLAGS = ["--classes", "1000", "--dim", "128", "--workers", "2", "--batch", "16", "--sample-rate", "0.5"]


def plan_json(argv, capsys) -> dict:
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_plan_json_from_flags_is_the_bytes_of_the_tensors_counted_by_hand(optimizer, capsys):
    """`reid plan`'s figures for one configuration against the tensors each component allocates,
    counted here (not by planning/): 1000 classes on 2 workers, 16 images each, d = 128 (a
    projection from ResNet-18's 512), half the classes sampled, bf16 (the default), 128x64 images."""
    report = plan_json([*FLAGS, "--arch", "resnet18", "--size", "128x64", "--optimizer", optimizer], capsys)
    f32, i64, bf16 = 4, 8, 2
    classes, workers, batch, dim = 1000, 2, 16, 128
    global_batch = workers * batch  # 32: the loss sees every worker's features (comm.gather_global_batch)
    rows = classes // workers  # 500: rank 0's shard
    active = 250  # ShardedClassifier.sample_rows: int(0.5 x 500), more than the batch's 32 classes at most
    chunk = active  # losses.default_chunk_size: 4 MiB / (4 B x max(32, 128)) = 8192 classes, more than 250
    # each row's optimizer state (parallel/row_optim.py): RowSGD's momentum; RowAdam's exp_avg and
    # exp_avg_sq and its float32 "steps" column
    state_per_row = dim * f32 if optimizer == "sgd" else (2 * dim + 1) * f32
    # a block's temporaries in the row update (TrainConfig's weight decay 5e-4 is L2 for both): SGD's
    # decayed gradient; Adam's decayed gradient, denominator, exp_avg / denominator and that x step size
    update_block_copies = 1 if optimizer == "sgd" else 4
    classifier = {
        "weights": rows * dim * f32,  # fp32 whatever the backbone's precision
        "optimizer_state": rows * state_per_row,
        "active_rows": active * (dim * f32 + i64),  # weight[rows], a copy, and the int64 rows
        "active_gradient": active * dim * f32,  # the copy is the leaf: its .grad
        "logits": global_batch * active * f32,  # the (global batch x active rows) buffer of losses.py
        "gathered_batch": global_batch * (2 * dim * f32 + i64),  # the features, their gradient, the labels
        # recomputing a chunk in backward: 6 (batch x chunk) temporaries (cosines, Circle's two factors,
        # the margin logits, two gradients), the chunk's rows' gradient and the features' gradient
        "chunk_temporaries": (6 * global_batch * chunk + (chunk + global_batch) * dim) * f32,
        # in step(): the sampled rows' state, gathered with state[rows]; then one block (all 250 rows)
        "update_temporaries": active * state_per_row + update_block_copies * active * dim * f32,
    }
    network = ReIDNet(ModelConfig(arch="resnet18", embedding_dim=dim))
    parameters = sum(p.numel() for p in network.parameters())
    trainable = sum(p.numel() for p in network.parameters() if p.requires_grad)  # not BNNeck's bias
    measured = json.loads(TABLE_PATH.read_text())["archs"]["resnet18"]["activations"]["last_stride_1"]
    fp32_activations = measured["bytes_per_image_pixel"] * 128 * 64 * batch + measured["fixed_bytes"]
    backbone = {
        "parameters": parameters * f32,  # autocast keeps fp32 weights
        "gradients": trainable * f32,  # DDP's buckets
        # torch.optim.SGD's momentum buffers; Adam's exp_avg and exp_avg_sq (its step counters are scalars)
        "optimizer_state": (1 if optimizer == "sgd" else 2) * trainable * f32,
        "autocast_weights": parameters * bf16,  # bf16 copies, saved for backward
        "activations": round(fp32_activations / 2),  # bf16 halves the fp32 measurement
        # torch's foreach SGD holds the decayed gradients through its update; foreach Adam deletes them
        # before it allocates sqrt(exp_avg_sq): one parameter-sized set at a time either way
        "update_temporaries": trainable * f32,
    }
    resident = classifier["weights"] + classifier["optimizer_state"]
    resident += backbone["parameters"] + backbone["gradients"] + backbone["optimizer_state"]
    rows_in_use = classifier["active_rows"] + classifier["active_gradient"]
    loss_backward = resident + backbone["activations"] + backbone["autocast_weights"] + rows_in_use
    loss_backward += classifier["logits"] + classifier["gathered_batch"] + classifier["chunk_temporaries"]
    optimizer_step = resident + rows_in_use
    optimizer_step += max(backbone["update_temporaries"], classifier["update_temporaries"])
    peak = max(loss_backward, optimizer_step)
    # on 2 workers an all-gather sends (W - 1) = 1 copy, a ring all-reduce 2 (W - 1) / W = 1 copy
    transfers = [
        batch * i64,  # labels
        batch * dim * f32,  # features
        global_batch * f32,  # the logits' row maxima
        4 * global_batch * f32,  # sums of exponentials, positive logits, logit sums, class counts
        global_batch * dim * f32,  # the features' gradient
        trainable * f32,  # DDP's gradient all-reduce
    ]

    assert report["classes_source"] == "--classes"
    assert (report["dim"], report["shard_rows"], report["active_classes"], report["chunk_classes"]) == (
        dim, rows, active, chunk
    )
    memory = report["memory_bytes"]
    assert memory["classifier"] == classifier and memory["backbone"] == backbone
    moments = (memory["loss_backward"], memory["optimizer_step"], memory["peak"])
    assert moments == (loss_backward, optimizer_step, peak)
    assert memory["total"] == peak + 1024**3  # the runtime under it, 1 GiB by default
    assert sorted(report["network"]["transfers"].values()) == sorted(transfers)
    assert report["network"]["total_bytes"] == sum(transfers)
    assert report["network"]["seconds"] == pytest.approx(sum(transfers) * 8 / 100e9)  # 100 Gbit/s default
    assert report["fits"] is (peak + 1024**3 <= 80 * 1024**3)
    # the largest class count: the plan of that many classes fits in the 80 GiB, one more does not
    most = report["max_classes"]
    more = [*FLAGS[2:], "--arch", "resnet18", "--size", "128x64", "--optimizer", optimizer]
    assert plan_json(["--classes", str(most), *more], capsys)["fits"] is True
    assert plan_json(["--classes", str(most + 1), *more], capsys)["fits"] is False


def test_plan_prints_a_table_by_default(capsys):
    assert main(["plan", *FLAGS, "--arch", "resnet18"]) == 0
    out = capsys.readouterr().out
    for line in ("classifier weights", "activations", "at the loss's backward", "features (all-gather, fp32)",
                 "Largest class count that fits in 80 GiB"):  # fmt: skip
        assert line in out


def test_plan_of_a_config_with_classes(capsys):
    report = plan_json([str(DEMO_CONFIG), "--classes", "751"], capsys)
    cfg = load_config(DEMO_CONFIG)
    workload = report["workload"]
    assert report["classes_source"] == "--classes" and workload["classes"] == 751
    assert (workload["arch"], workload["batch"], workload["workers"]) == (
        cfg.model.arch,
        cfg.input.batch_size,
        cfg.scaling.max_workers,
    )
    assert (workload["height"], workload["width"]) == (cfg.input.height, cfg.input.width)
    assert workload["optimizer"]["name"] == cfg.train.optimizer
    assert workload["precision"] == "fp32"  # precision auto on CPU workers (scaling.use_gpu: false)


def test_plan_of_a_config_counts_the_classes_in_its_manifest(tiny_shards, capsys):
    report = plan_json([str(DEMO_CONFIG), "--set", f"data.shards={tiny_shards}"], capsys)
    assert report["workload"]["classes"] == Manifest.read(tiny_shards).num_classes
    assert (
        report["classes_source"].startswith("the manifest") and str(tiny_shards) in report["classes_source"]
    )


def test_plan_of_an_elastic_config_gives_each_worker_its_share_of_the_global_batch(capsys):
    argv = [
        str(DEMO_CONFIG),
        "--classes",
        "100",
        "--set",
        "scaling.num_workers=[1,2]",
        "--workers",
        "1",
    ]
    report = plan_json(argv, capsys)
    cfg = load_config(DEMO_CONFIG, ["scaling.num_workers=[1,2]"])
    assert report["workload"]["batch"] == cfg.on_workers(1).input.batch_size == 2 * cfg.input.batch_size


@pytest.mark.parametrize(
    "argv, option",
    [
        (["--classes", "0", *FLAGS[2:]], "--classes"),
        (["--classes", "-5", *FLAGS[2:]], "--classes"),
        ([*FLAGS[:2], "--dim", "0", *FLAGS[4:]], "--dim"),
        ([*FLAGS[:4], "--workers", "-1", *FLAGS[6:]], "--workers"),
        ([*FLAGS[:6], "--batch", "0", *FLAGS[8:]], "--batch"),
        ([*FLAGS[:6], "--batch", "1", *FLAGS[8:]], "--batch (input.batch_size)"),  # positive, but no run takes it
        ([*FLAGS[:2], "--dim", "4", *FLAGS[4:]], "--dim (model.embedding_dim)"),
        ([*FLAGS, "--size", "8x8"], "--size (input.height)"),
        ([*FLAGS[:8], "--sample-rate", "0"], "--sample-rate"),
        ([*FLAGS[:8], "--sample-rate", "1.5"], "--sample-rate"),
        (["--classes", "3", *FLAGS[2:4], "--workers", "4", *FLAGS[6:]], "--workers"),
        ([*FLAGS, "--arch", "vgg16"], "--arch"),
        ([*FLAGS, "--size", "256"], "--size"),
        ([*FLAGS, "--size", "0x128"], "--size"),
        ([*FLAGS, "--gpu-memory", "0"], "--gpu-memory"),
        ([*FLAGS, "--bandwidth", "-1"], "--bandwidth"),
        ([*FLAGS, "--runtime-memory", "-0.5"], "--runtime-memory"),
        ([*FLAGS, "--runtime-memory", "nan"], "--runtime-memory"),
        (FLAGS[2:], "--classes"),
        ([str(DEMO_CONFIG), "--set", "data.shards=/nonexistent"], "--classes"),
        ([str(DEMO_CONFIG), "--classes", "100", "--dim", "64"], "--dim"),
        (
            [str(DEMO_CONFIG), "--classes", "100", "--set", "model.arch=timm/convnext_tiny"],
            "model.arch",
        ),
    ],
)
def test_bad_input_is_one_line_naming_the_option_and_exit_2(argv, option, capsys):
    assert main(["plan", *argv]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"reid: config error: {option}:")


def test_max_classes_grows_with_workers_and_a_lower_sample_rate():
    base = Workload(classes=10**6, workers=8, batch=128, sample_rate=1.0)
    profile, memory = PROFILES["resnet50"], 80 * 1024**3
    most = max_classes(base, profile, memory)
    assert max_classes(replace(base, workers=16), profile, memory) > most
    assert max_classes(replace(base, sample_rate=0.1), profile, memory) > most


def test_runtime_memory_is_added_to_the_peak(capsys):
    default = plan_json(FLAGS, capsys)["memory_bytes"]
    none = plan_json([*FLAGS, "--runtime-memory", "0"], capsys)["memory_bytes"]
    two = plan_json([*FLAGS, "--runtime-memory", "2"], capsys)["memory_bytes"]
    assert default["peak"] == none["peak"] == two["peak"] == none["total"]
    assert default["total"] - default["peak"] == Workload(1, 1, 1).runtime_bytes
    assert two["total"] - two["peak"] == 2 * 1024**3
