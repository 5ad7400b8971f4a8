"""The whole pipeline at scale: N identities of K tiny images, every phase timed and measured.

    python benchmarks/scale.py --identities 1000000 --images-per-identity 2 --size 64x32

Phases, one JSON line each (seconds, peak RSS of every process of the phase, bytes its processes
wrote and read at the block layer):

- ``synth``: N x K training JPEGs plus a gallery of ``--gallery`` images (2 per test identity) and
  ``--queries`` queries, straight into a CSV-manifest tree (2 processes);
- ``pack``: ``reid data pack`` of that tree (images/s against the 1,000/s target);
- ``train_shuffle_r1`` and ``train_identity_r01``: ``reid train`` on a local Ray cluster, 2 workers,
  ``--steps`` steps: the shuffled reader at sample rate 1.0, then the identity sampler at 0.1. From
  the command to the first optimisation step (the untrained model's evaluation, on the whole
  gallery, reported separately as ``evaluation_s``), and the steps' rate; ``reid plan`` of the same
  config (``plan_mb``: the tensors' peak and the total with the runtime) and the largest worker's
  peak RSS over that total;
- ``resume_w1`` and ``resume_w3``: the first run's checkpoint loaded by the engine on 1 and on 3 gloo
  processes, the classifier's rows and optimizer state reduced to a digest that does not depend on
  how rows are split (equal digests: identical rows); on 1 process also the checkpoint written
  again and read back, against a plain sequential write and read of the same bytes in the same run
  (the page cache dropped for the files before each read).

Before anything is written the disk and memory it needs are estimated; it refuses to start when
this machine has not got them.
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import DEMO_CONFIG  # noqa: E402

GiB = 1024**3
FILES_PER_FOLDER = 2000
# Per sample: a ~1 KB JPEG in a 4 KB block of the raw tree, and in a shard its 3 members with their
# 512-byte tar headers and padding; measured on 64x32 images.
RAW_BYTES, SHARD_BYTES = 4096 + 200, 3700


# -- measuring a phase ---------------------------------------------------------------------------


class ProcessTree:
    """Peak RSS (VmHWM) and block-layer bytes of a process and all its descendants, sampled."""

    def __init__(self, root: int, interval_s: float = 0.5):
        self.root, self.interval_s = root, interval_s
        self.peak: dict[int, tuple[str, int]] = {}
        self.io: dict[int, tuple[int, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ProcessTree:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def sample(self) -> None:
        try:
            processes = [psutil.Process(self.root), *psutil.Process(self.root).children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for process in processes:
            try:
                status = Path(f"/proc/{process.pid}/status").read_text()
                hwm = int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) * 1024
                io = Path(f"/proc/{process.pid}/io").read_text().split()
                name = " ".join(process.cmdline()[:3])[-80:] or process.name()
            except (OSError, psutil.Error, StopIteration):
                continue
            fields = dict(zip(io[::2], io[1::2]))
            self.peak[process.pid] = (name, max(hwm, self.peak.get(process.pid, ("", 0))[1]))
            self.io[process.pid] = (int(fields["read_bytes:"]), int(fields["write_bytes:"]))

    def summary(self) -> dict:
        peaks = sorted(((mb(rss), name) for name, rss in self.peak.values()), reverse=True)
        return {
            "peak_rss_mb": [{"process": name, "mb": value} for value, name in peaks if value >= 250],
            "bytes_read": sum(read for read, _ in self.io.values()),
            "bytes_written": sum(written for _, written in self.io.values()),
        }


def mb(value: float) -> float:
    return round(value / 1024**2, 1)


def report(phase: str, **fields) -> dict:
    line = {"phase": phase, **fields}
    print(json.dumps(line), flush=True)
    return line


def in_child(function, *args) -> tuple[float, dict, object]:
    """``function(*args)`` in a fresh spawned process, measured: (seconds, ProcessTree summary, result)."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=_child, args=(results, function, args))
    started = time.perf_counter()
    process.start()
    with ProcessTree(process.pid) as tree:
        result = results.get()
        process.join()
    if process.exitcode != 0 or isinstance(result, BaseException):
        raise RuntimeError(f"{function.__name__} failed: {result}")
    return time.perf_counter() - started, tree.summary(), result


def _child(results, function, args) -> None:
    try:
        results.put(function(*args))
    except BaseException as error:
        results.put(RuntimeError(repr(error)))
        raise


# -- synth and pack ------------------------------------------------------------------------------


def _identity_images(job: tuple[Path, list[tuple[str, int, int]], tuple[int, int]]) -> int:
    """Write the JPEGs of a list of (relative path, person id, camera); each identity has its own
    colours, each image its own noise and shift."""
    from PIL import Image

    root, items, (height, width) = job
    for relative, person, camera in items:
        rng = np.random.default_rng([person, camera, len(relative)])
        colours = np.random.default_rng(person).integers(0, 256, (4, 3))
        image = np.repeat(colours, height // 4, axis=0)[:, None, :].repeat(width, axis=1).astype(np.int16)
        image = np.roll(image, int(rng.integers(-3, 4)), axis=0) + rng.integers(-40, 41, image.shape)
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(path, "JPEG", quality=90)
    return len(items)


def synthesise(root: Path, identities: int, per_identity: int, gallery: int, queries: int, size: tuple[int, int]) -> int:
    rows = []
    for person in range(identities):
        rows += [(f"train/{person // FILES_PER_FOLDER}/{person}_{k}.jpg", person, k % 6, "train") for k in range(per_identity)]
    for number in range(gallery // 2):
        person = identities + number
        rows += [(f"gallery/{person // FILES_PER_FOLDER}/{person}_{k}.jpg", person, k, "gallery") for k in range(2)]
        if number < queries:
            rows.append((f"query/{person // FILES_PER_FOLDER}/{person}.jpg", person, 2, "query"))
    root.mkdir(parents=True)
    with (root / "manifest.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([("path", "person_id", "camera_id", "split"), *rows])
    chunks = [(root, [row[:3] for row in rows[i : i + 4096]], size) for i in range(0, len(rows), 4096)]
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        return sum(pool.imap_unordered(_identity_images, chunks))


def pack(root: Path, shards: Path) -> dict:
    from reid_platform.data.pack import PackOptions, pack_dataset

    manifest = pack_dataset([("csv", root / "manifest.csv")], shards, PackOptions(samples_per_shard=10_000, workers=2), progress=False)
    return {split: entry.samples for split, entry in manifest.splits.items()}


# -- training through the CLI --------------------------------------------------------------------


def train_settings(args, work: Path, name: str, sampler: str, rate: float) -> list[str]:
    height, width = args.size
    return [
        f"data.shards={work / 'shards'}", "model.arch=resnet18", "model.pretrained=none", f"model.embedding_dim={args.dim}",
        f"input.height={height}", f"input.width={width}", "input.pad=2", f"input.batch_size={args.batch}",
        f"input.sampler={sampler}", "input.images_per_identity=2", "input.num_threads=1",
        f"loss.sample_rate={rate}", f"scaling.num_workers={args.workers}", f"scaling.cpus_per_worker={2 / args.workers}",
        "train.epochs=1", f"train.steps_per_epoch={args.steps}", "train.warmup_epochs=0",
        f"run.storage_path={work / 'ray'}", f"run.output_dir={work / 'out' / name}", f"run.name={name}",
        f"tracking.uri=sqlite:///{work / 'mlflow.db'}", "tracking.registered_model=reid-scale",
        "tracking.system_metrics=false",
    ]  # fmt: skip


def train(args, work: Path, name: str, sampler: str, rate: float) -> dict:
    """``reid train`` as a user runs it; times from its start to lines of its job log."""
    command = [str(Path(sys.executable).parent / "reid"), "train", str(DEMO_CONFIG)]
    for setting in train_settings(args, work, name, sampler, rate):
        command += ["--set", setting]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=work)
    marks: dict[str, float] = {}
    with ProcessTree(process.pid) as tree, (work / f"{name}.log").open("w") as log:
        for line in process.stdout:
            log.write(line)
            for mark, text in (("evaluated", "before training:"), ("first_step", "first optimisation step done"), ("epoch", "epoch 1/1")):
                if text in line and mark not in marks:
                    marks[mark] = time.perf_counter() - started
                    if mark == "evaluated":
                        marks["evaluation_s"] = float(line.rsplit("(", 1)[1].split(" s)")[0])
        process.wait()
    if process.returncode != 0:
        raise RuntimeError(f"reid train {name} failed ({process.returncode}); see {work / f'{name}.log'}")
    results = json.loads((work / "out" / name / "results.json").read_text())
    measured = tree.summary()
    return {
        "seconds": round(time.perf_counter() - started, 1),
        "to_first_step_s": round(marks["first_step"] - marks["evaluation_s"], 1),
        "to_first_step_with_evaluation_s": round(marks["first_step"], 1),
        "evaluation_s": marks["evaluation_s"],
        "steps": args.steps,
        "steps_per_s": round(args.steps / (marks["epoch"] - marks["first_step"]), 3),
        "mAP": results["mAP"], "rank1": results["rank1"],
        **measured,
        **planned(command, measured),
    }  # fmt: skip


def planned(train_command: list[str], measured: dict) -> dict:
    """``reid plan`` of the run's config, and the largest training worker's peak RSS over its total."""
    command = [train_command[0], "plan", *train_command[2:], "--json"]
    memory = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)["memory_bytes"]
    workers = [entry["mb"] for entry in measured["peak_rss_mb"] if entry["process"].startswith("ray::RayTrainWorker")]
    return {
        "plan_mb": {"peak": mb(memory["peak"]), "total": mb(memory["total"])},
        "worker_rss_over_plan": round(max(workers) / mb(memory["total"]), 3) if workers else None,
    }


# -- resume and checkpoint throughput ------------------------------------------------------------


def rows_digest(start: int, tensors: dict) -> int:
    """A sum over rows of (2 * global row + 1) x a hash of the row's bits, in uint64 arithmetic
    (wrapping), of rows from global row ``start`` on: the same for any split of the rows over ranks,
    different for any changed bit. ``tensors``: the rows' weight and optimizer state, numpy or torch."""
    state = {name: np.asarray(tensor) for name, tensor in tensors.items()}
    dim = next(iter(state.values())).shape[1]
    multipliers = np.random.default_rng(0).integers(1, 2**63, dim, dtype=np.uint64) | np.uint64(1)
    total = np.uint64(0)
    with np.errstate(over="ignore"):
        for name in sorted(state):
            rows = state[name].view(np.uint32)
            for lo in range(0, len(rows), 1 << 16):
                block = rows[lo : lo + (1 << 16)].astype(np.uint64)
                index = np.arange(start + lo, start + lo + len(block), dtype=np.uint64)
                total += ((block * multipliers).sum(axis=1) * (index * np.uint64(2) + np.uint64(1))).sum()
    return int(total)


def _resume_rank(rank: int, world_size: int, settings: list[str], checkpoint: str, measure_io: bool) -> dict:
    import torch

    from reid_platform.config import load_config
    from reid_platform.data.manifest import ShardDataset
    from reid_platform.train.checkpoint import open_checkpoint
    from reid_platform.train.engine import Engine

    torch.set_num_threads(max(1, 2 // world_size))
    cfg = load_config(DEMO_CONFIG, settings).on_workers(world_size)
    engine = Engine(cfg, ShardDataset.open(cfg.data.shards), torch.device("cpu"))
    directory = Path(checkpoint)
    _drop_cache(directory)
    started = time.perf_counter()
    with open_checkpoint(directory) as state:
        engine.load_state_dict(state)
    rows = engine.classifier.shard_state()["slices"][0]
    tensors = {name: tensor.cpu() for name, tensor in rows.items() if name not in ("start", "end")}
    result = {"load_s": time.perf_counter() - started, "digest": rows_digest(rows["start"], tensors)}
    if measure_io:
        result.update(_checkpoint_io(engine, directory.parent / "rewritten"))
    return result


def _checkpoint_io(engine, out: Path) -> dict:
    """Write the engine's checkpoint and read it back, and the same bytes written and read plainly."""
    from reid_platform.train.checkpoint import open_checkpoint, save_checkpoint

    out.mkdir()
    started = time.perf_counter()
    save_checkpoint(engine.state_dict(), out, 0)
    _sync(out)
    write_s = time.perf_counter() - started
    size = sum(path.stat().st_size for path in out.rglob("*") if path.is_file())
    plain = out.parent / "plain.bin"
    block = np.ones(64 * 1024**2, np.uint8)
    started = time.perf_counter()
    with plain.open("wb") as handle:
        for start in range(0, size, block.size):
            handle.write(block.data[: min(block.size, size - start)])
        handle.flush()
        os.fsync(handle.fileno())
    plain_write_s = time.perf_counter() - started
    _drop_cache(out)
    _drop_cache(plain)
    started = time.perf_counter()
    with open_checkpoint(out) as state:
        engine.load_state_dict(state)
    read_s = time.perf_counter() - started
    started = time.perf_counter()
    with plain.open("rb") as handle:
        while handle.readinto(block.data):
            pass
    plain_read_s = time.perf_counter() - started
    shutil.rmtree(out)
    plain.unlink()
    return {
        "checkpoint_bytes": size,
        "write_mb_s": mb(size / write_s), "plain_write_mb_s": mb(size / plain_write_s),
        "read_mb_s": mb(size / read_s), "plain_read_mb_s": mb(size / plain_read_s),
    }  # fmt: skip


def _sync(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with path.open("rb+") as handle:
                os.fsync(handle.fileno())


def _drop_cache(path: Path) -> None:
    """Evict ``path`` (a file or every file under it) from the page cache, so that a read is a disk read."""
    for file in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        with file.open("rb") as handle:
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def resume(world_size: int, settings: list[str], checkpoint: str, measure_io: bool) -> dict:
    from benchmarks.common import on_engines

    ranks = on_engines(world_size, _resume_rank, settings, checkpoint, measure_io)
    digest = sum(rank["digest"] for rank in ranks) % 2**64
    return {"load_s": round(max(rank["load_s"] for rank in ranks), 1), "digest": f"{digest:016x}",
            **{key: value for key, value in ranks[0].items() if key not in ("load_s", "digest")}}  # fmt: skip


def saved_digest(checkpoint: Path) -> int:
    """The digest of the rows as the checkpoint's files hold them (independent of any engine)."""
    from safetensors.numpy import load_file

    files = sorted((checkpoint / "classifier").glob("rows-*.safetensors"))
    return sum(rows_digest(int(path.stem.split("-")[1]), load_file(path)) for path in files) % 2**64


# -- the run -------------------------------------------------------------------------------------


def estimate(args) -> dict:
    samples = args.identities * args.images_per_identity + args.gallery + args.queries
    classifier = args.identities * args.dim * 4 * 3  # rows and Adam's two moments
    return {
        "samples": samples,
        "disk_gb": round((samples * (RAW_BYTES + SHARD_BYTES) + 4 * classifier) / GiB, 1),
        "memory_gb": round((classifier + 4 * GiB) / GiB, 1),  # the whole classifier in one resumed process
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--identities", type=int, default=1_000_000)
    parser.add_argument("--images-per-identity", type=int, default=2)
    parser.add_argument("--size", default="64x32", help="HxW of the images and the network input")
    parser.add_argument("--gallery", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=2_000)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32, help="per worker")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--work", type=Path, default=Path("/tmp/reid-scale"))
    args = parser.parse_args()
    for option in ("identities", "images_per_identity", "gallery", "queries", "steps", "batch", "workers", "dim"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1")
    try:
        args.size = tuple(int(part) for part in args.size.split("x"))
        assert len(args.size) == 2 and min(args.size) >= 8
    except (ValueError, AssertionError):
        parser.error(f"--size: expected HxW (at least 8x8), got {args.size!r}")

    needs = estimate(args)
    free_disk = shutil.disk_usage(args.work.parent).free / GiB
    memory = psutil.virtual_memory().total / GiB
    report("estimate", **needs, free_disk_gb=round(free_disk, 1), memory_gb_total=round(memory, 1))
    if needs["disk_gb"] > free_disk or needs["memory_gb"] > memory:
        sys.exit(f"scale.py: needs about {needs['disk_gb']} GB of disk and {needs['memory_gb']} GB of memory; "
                 f"{args.work.parent} has {free_disk:.1f} GB free and this machine {memory:.1f} GB")  # fmt: skip
    if args.work.exists():
        sys.exit(f"scale.py: {args.work} exists; remove it or pass another --work")
    work = args.work
    work.mkdir(parents=True)

    seconds, tree, images = in_child(synthesise, work / "raw", args.identities, args.images_per_identity, args.gallery,
                                     args.queries, args.size)  # fmt: skip
    report("synth", seconds=round(seconds, 1), images=images, images_per_s=round(images / seconds), **tree)
    seconds, tree, splits = in_child(pack, work / "raw", work / "shards")
    packed = sum(splits.values())
    report("pack", seconds=round(seconds, 1), images=packed, images_per_s=round(packed / seconds), splits=splits,
           target_images_per_s=1000, **tree)  # fmt: skip
    shutil.rmtree(work / "raw")  # the shards hold it all now

    report("train_shuffle_r1", **train(args, work, "shuffle_r1", "shuffle", 1.0))
    report("train_identity_r01", **train(args, work, "identity_r01", "identity", 0.1))

    checkpoint = max(path for path in (work / "ray" / "shuffle_r1").glob("checkpoint_*") if path.is_dir())
    saved = saved_digest(checkpoint)
    settings = train_settings(args, work, "shuffle_r1", "shuffle", 1.0)
    for world_size in (1, 3):
        seconds, tree, result = in_child(resume, world_size, settings, str(checkpoint), world_size == 1)
        report(f"resume_w{world_size}", seconds=round(seconds, 1), saved_digest=f"{saved:016x}",
               identical=result["digest"] == f"{saved:016x}", **result, **tree)  # fmt: skip


if __name__ == "__main__":
    from benchmarks import scale  # spawned processes find the phases by this module's name, not __main__

    scale.main()
