"""`reid plan`: per-worker memory, network bytes per step and the largest class count that fits,
before renting a cluster (``reid_platform/planning/`` does the arithmetic)."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, replace

from reid_platform.cli.common import add_run_config, format_columns, image_size
from reid_platform.errors import ConfigError

GIB = 1024**3
DEFAULT_GPU_MEMORY_GIB = 80.0  # an A100 / H100 80 GB
DEFAULT_BANDWIDTH_GBIT = 100.0  # one 100 Gbit/s NIC per GPU; NVLink within a node is faster
# without a CONFIG: the run the flags describe unless told otherwise (optimizer: train.optimizer's default)
DEFAULT_ARCH, DEFAULT_SIZE, DEFAULT_PRECISION = "resnet50", "256x128", "bf16"
# the flags a CONFIG decides instead, with the key that does
CONFIG_KEYS = {
    "dim": ("--dim", "model.embedding_dim"),
    "batch": ("--batch", "input.batch_size"),
    "sample_rate": ("--sample-rate", "loss.sample_rate"),
    "arch": ("--arch", "model.arch"),
    "size": ("--size", "input.height and input.width"),
    "precision": ("--precision", "train.precision"),
    "optimizer": ("--optimizer", "train.optimizer"),
}
REQUIRED_FLAGS = {
    "classes": "--classes",
    "dim": "--dim",
    "workers": "--workers",
    "batch": "--batch",
    "sample_rate": "--sample-rate",
}


def _positive(option: str, value: float) -> float:
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{option}: must be a positive finite number (got {value:g})")
    return value


def _check_sample_rate(option: str, rate: float) -> None:
    if not 0.0 < rate <= 1.0:
        raise ConfigError(f"{option}: must be in (0, 1], the fraction of classes a step uses (got {rate:g})")


def _check_split(classes: int, workers: int, source: str) -> None:
    if workers > classes:
        raise ConfigError(
            f"--workers: {workers} workers need at least as many classes, {source} gives {classes}"
        )


def _profile(profiles: dict, arch: str, option: str):
    if arch not in profiles:
        raise ConfigError(
            f"{option}: no measured memory for {arch!r} (measured: {', '.join(sorted(profiles))}); "
            f"measure it with python benchmarks/backbone_memory.py --arch {arch}"
        )
    return profiles[arch]


def _workload_from_flags(args: argparse.Namespace, profiles: dict):
    """(workload, profile, where the classes came from) from the command line alone: a run config's
    defaults with the flags as its overrides (``--classes`` stands in for a dataset)."""
    from reid_platform.config import config_from_tree
    from reid_platform.planning.workload import Workload

    for name, option in REQUIRED_FLAGS.items():
        if getattr(args, name) is None:
            raise ConfigError(f"{option}: required without a CONFIG")
    if args.set:
        raise ConfigError("--set: overrides a CONFIG's keys; give the CONFIG first")
    for name in ("classes", "dim", "workers", "batch"):
        _positive(REQUIRED_FLAGS[name], getattr(args, name))
    _check_sample_rate("--sample-rate", args.sample_rate)
    _check_split(args.classes, args.workers, "--classes")
    height, width = image_size(args.size or DEFAULT_SIZE, "--size")
    profile = _profile(profiles, args.arch or DEFAULT_ARCH, "--arch")
    precision = args.precision or DEFAULT_PRECISION
    dim = "null" if args.dim == profile.width else args.dim  # the trunk's width needs no projection
    overrides = [
        f"model.arch={profile.arch}", f"model.embedding_dim={dim}",
        f"input.batch_size={args.batch}", f"input.height={height}", f"input.width={width}",
        f"loss.sample_rate={args.sample_rate!r}",
        f"train.precision={'bf16' if precision == 'fp16' else precision}",  # no fp16 run: sized as bf16
        *([f"train.optimizer={args.optimizer}"] if args.optimizer else []),
    ]  # fmt: skip
    try:  # a run config needs data.shards; --classes stands in for what the dataset would give
        cfg = config_from_tree({"data": {"shards": "-"}}, overrides, "command line")
    except ConfigError as error:  # a value no run config takes: name the flag that gave it
        raise ConfigError(_flags_named(str(error))) from None
    workload = Workload.from_config(cfg, args.classes, args.workers)
    return replace(workload, precision=precision), profile, "--classes"  # fp16 keeps its name


def _flags_named(message: str) -> str:
    """``message`` of the flags' run config with each key preceded by the flag that set it:
    ``--batch (input.batch_size): ...``."""
    message = message.removeprefix("command line: invalid config: ")
    for option, keys in CONFIG_KEYS.values():
        for key in keys.split(" and "):
            message = message.replace(f"{key}:", f"{option} ({key}):")
    return message


def _workload_from_config(args: argparse.Namespace, profiles: dict):
    """(workload, profile, where the classes came from) from a run config, as its workers would run it."""
    from reid_platform.config import load_config
    from reid_platform.planning.workload import Workload

    for name, (option, key) in CONFIG_KEYS.items():
        if getattr(args, name) is not None:
            raise ConfigError(f"{option}: a CONFIG gives it ({key}); change it with --set")
    cfg = load_config(args.config, args.set)
    workers = (
        int(_positive("--workers", args.workers)) if args.workers is not None else cfg.scaling.max_workers
    )
    classes, source = _config_classes(args, cfg)
    _check_split(classes, workers, source)
    profile = _profile(profiles, cfg.model.arch, "model.arch")
    return Workload.from_config(cfg, classes, workers), profile, source


def _config_classes(args: argparse.Namespace, cfg) -> tuple[int, str]:
    """--classes, else the dataset's manifest: (classes, which of them it was)."""
    from reid_platform.data.manifest import MANIFEST, Manifest
    from reid_platform.storage import files, s3

    if args.classes is not None:
        return int(_positive("--classes", args.classes)), "--classes"
    s3.use_endpoint(cfg.data.s3_endpoint)
    manifest = cfg.data.shards / MANIFEST
    if not files.is_file(manifest):
        raise ConfigError(f"--classes: needed, since data.shards has no {manifest} to count the classes in")
    return Manifest.read(cfg.data.shards).num_classes, f"the manifest {manifest}"


def _size(count: int) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{count} B"


def _memory_rows(plan) -> list[list[str]]:
    from reid_platform.planning.capacity import FLOAT32

    w, c, b = plan.workload, plan.classifier, plan.backbone
    batch, rows, active = w.global_batch, plan.shard_rows, plan.active_classes
    optimizer = w.train.optimizer
    state = "momentum" if optimizer == "sgd" else "2 moments + a step count per row"
    sampled = f"{active:,} of {rows:,} rows, copied" if w.sample_rate < 1 else "none: all rows used in place"
    precision = f"{w.precision} (half of fp32's)" if w.half_precision else "fp32"
    autocast = w.precision if w.half_precision else "none in fp32"
    return [
        ["classifier weights", _size(c.weights), f"{rows:,} x {plan.dim} fp32 (the largest shard)"],
        ["classifier optimizer state", _size(c.optimizer_state), f"{optimizer}: {state}, fp32"],
        ["active rows", _size(c.active_rows), sampled],
        ["active rows' gradient", _size(c.active_gradient), f"{active:,} x {plan.dim} fp32"],
        ["logits", _size(c.logits), f"{batch:,} x {active:,} fp32 (global batch x active rows)"],
        ["gathered batch", _size(c.gathered_batch), f"{batch:,} features, their gradient, labels"],
        ["chunk temporaries", _size(c.chunk_temporaries), f"{plan.chunk_classes:,} classes a chunk"],
        ["classifier update temporaries", _size(c.update_temporaries), "sampled rows' state, the update's"],
        ["backbone parameters", _size(b.parameters), f"{b.parameters / FLOAT32 / 1e6:.1f} M fp32"],
        ["backbone gradients", _size(b.gradients), "fp32 (DDP's buckets)"],
        ["backbone optimizer state", _size(b.optimizer_state), optimizer],
        ["autocast weight copies", _size(b.autocast_weights), autocast],
        ["activations", _size(b.activations), f"{w.batch} images of {w.height}x{w.width}, {precision}"],
        ["backbone update temporaries", _size(b.update_temporaries), f"torch's foreach {optimizer}"],
    ]


def _report_text(plan, source: str, memory: int, bandwidth: float, most: int) -> str:
    w = plan.workload
    lines = [
        (
            f"Plan: {w.classes:,} classes (from {source}) x {plan.dim} dims on {w.workers} workers, "
            f"{w.batch} images per worker (global batch {w.global_batch:,}), sample rate {w.sample_rate:g}"
        ),
        f"  {w.arch} at {w.height}x{w.width}, {w.precision}, {w.train.optimizer}",
        "",
        format_columns(["memory per worker", "size", "what"], _memory_rows(plan)),
        "",
        format_columns(["peak", "size", ""], _peak_rows(plan, memory)),
        "",
        _network_text(plan, bandwidth),
        "",
        f"Largest class count that fits in {memory / GIB:g} GiB per worker, everything else as above: "
        + (f"{most:,}" if most else "none (the backbone alone does not fit)"),
    ]
    return "\n".join(lines)


def _peak_rows(plan, memory: int) -> list[list[str]]:
    verdict = "fits" if plan.total <= memory else "does NOT fit"
    return [
        ["at the loss's backward", _size(plan.loss_backward), "activations, logits and gradients held"],
        ["at the optimizer step", _size(plan.optimizer_step), "activations freed, update temporaries"],
        ["peak", _size(plan.peak), "the tensors (torch.cuda.max_memory_allocated)"],
        ["runtime", _size(plan.workload.runtime_bytes), "CUDA context, NCCL, allocator slack (--runtime-memory)"],
        ["total", _size(plan.total), f"of {memory / GIB:g} GiB: {verdict}"],
    ]


def _network_text(plan, bandwidth: float) -> str:
    if not plan.transfers:
        return "Network: none (one worker runs no collectives)"
    rows = [[transfer.name, _size(transfer.bytes)] for transfer in plan.transfers]
    seconds = plan.network_seconds(bandwidth * 1e9)
    rows.append(["total", f"{_size(plan.network_bytes)}, {seconds * 1e3:.1f} ms at {bandwidth:g} Gbit/s"])
    return format_columns(["sent per worker and step (ring collectives)", "bytes"], rows)


def _workload_json(workload) -> dict:
    """The workload's fields, in order, its ``train`` section as the optimizer settings it plans for."""
    report = {}
    for name, value in vars(workload).items():
        if name == "train":
            settings = {"momentum": value.momentum, "weight_decay": value.weight_decay}
            name, value = "optimizer", {"name": value.optimizer, **settings}
        report[name] = value
    return report


def _report_json(plan, source: str, memory: int, bandwidth: float, most: int) -> str:
    report = {
        "workload": _workload_json(plan.workload),
        "classes_source": source,
        "dim": plan.dim,
        "shard_rows": plan.shard_rows,
        "active_classes": plan.active_classes,
        "chunk_classes": plan.chunk_classes,
        "memory_bytes": {
            "classifier": asdict(plan.classifier),
            "backbone": asdict(plan.backbone),
            "loss_backward": plan.loss_backward,
            "optimizer_step": plan.optimizer_step,
            "peak": plan.peak,
            "runtime": plan.workload.runtime_bytes,
            "total": plan.total,
        },
        "gpu_memory_bytes": memory,
        "fits": plan.total <= memory,
        "network": {
            "transfers": {transfer.name: transfer.bytes for transfer in plan.transfers},
            "total_bytes": plan.network_bytes,
            "bandwidth_gbit_s": bandwidth,
            "seconds": plan.network_seconds(bandwidth * 1e9),
        },
        "max_classes": most,
    }
    return json.dumps(report, indent=2)


def _cmd_plan(args: argparse.Namespace) -> int:
    from reid_platform.model.backbone_memory import load_profiles
    from reid_platform.planning.capacity import max_classes, plan

    profiles = load_profiles()
    build = _workload_from_config if args.config else _workload_from_flags
    workload, profile, source = build(args, profiles)
    memory = round(_positive("--gpu-memory", args.gpu_memory) * GIB)
    bandwidth = _positive("--bandwidth", args.bandwidth)
    if args.runtime_memory is not None:
        if not args.runtime_memory >= 0:  # also refuses nan
            raise ConfigError(f"--runtime-memory: must be at least 0, got {args.runtime_memory}")
        workload = replace(workload, runtime_bytes=round(args.runtime_memory * GIB))
    result = plan(workload, profile)
    most = max_classes(workload, profile, memory)
    report = _report_json if args.json else _report_text
    print(report(result, source, memory, bandwidth, most))
    return 0


def add_commands(commands) -> None:
    parser = commands.add_parser(
        "plan", help="per-worker memory, network bytes per step and the most classes that fit, before renting GPUs",
        description="Size a training run per worker: memory (classifier shard, backbone), bytes each step "
        "sends, and the largest class count that fits. Give the sizes as flags, or a CONFIG (and --classes "
        "unless its data.shards has a manifest).",
    )  # fmt: skip
    add_run_config(parser, "YAML run config to take every value from", optional=True)
    parser.add_argument(
        "--classes", type=int, help="identities of the classifier (with a CONFIG: default its manifest's)"
    )
    parser.add_argument("--dim", type=int, help="embedding size (the trunk's width: no projection)")
    parser.add_argument(
        "--workers", type=int, help="GPUs (with a CONFIG: default scaling.num_workers, its MAX)"
    )
    parser.add_argument("--batch", type=int, help="images per worker (input.batch_size)")
    parser.add_argument(
        "--sample-rate", type=float, help="fraction of classes per step, (0, 1] (loss.sample_rate)"
    )
    parser.add_argument("--arch", help="model.arch (default resnet50)")
    parser.add_argument("--size", metavar="HxW", help="input height x width (default 256x128)")
    parser.add_argument(
        "--precision", choices=("fp32", "bf16", "fp16"),
        help="backbone autocast (default bf16); fp16 sizes as bf16, for comparing with other systems",
    )  # fmt: skip
    parser.add_argument(
        "--optimizer", choices=("sgd", "adam", "adamw"), help="both halves' optimizer (default adam)"
    )
    parser.add_argument(
        "--gpu-memory", type=float, default=DEFAULT_GPU_MEMORY_GIB, metavar="GIB",
        help=f"memory per GPU in GiB (default {DEFAULT_GPU_MEMORY_GIB:g})",
    )  # fmt: skip
    parser.add_argument(
        "--runtime-memory", type=float, metavar="GIB",
        help="what each worker holds before its own tensors: CUDA context, NCCL, allocator slack "
        "(default 1, planning.workload.RUNTIME_BYTES)",
    )  # fmt: skip
    parser.add_argument(
        "--bandwidth", type=float, default=DEFAULT_BANDWIDTH_GBIT, metavar="GBIT_PER_S",
        help=f"network per worker in Gbit/s (default {DEFAULT_BANDWIDTH_GBIT:g})",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.set_defaults(handler=_cmd_plan)
