"""Config validation: every problem names the file and the key path, exit status 2, nothing starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from reid_platform.cli import main
from reid_platform.config import ConfigError, load_config
from reid_platform.run.launcher import check_inputs
from tests import DEMO_CONFIG, REPO


@pytest.mark.parametrize("name", ["demo.yaml", "market1501_r50.yaml"])
def test_shipped_configs_are_valid(name):
    cfg = load_config(REPO / "configs" / name)
    assert cfg.loss.name == "circle"


def test_overrides_are_typed_and_nested():
    cfg = load_config(DEMO_CONFIG, ["train.epochs=3", "loss.scale=128", "model.arch=resnet50"])
    assert (cfg.train.epochs, cfg.loss.scale, cfg.model.arch) == (3, 128.0, "resnet50")


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.epochz=3", "train.epochz: Extra inputs are not permitted"),
        ("train.epochs=three", "train.epochs: Input should be a valid integer"),
        ("train.epochs=0", "train.epochs: Input should be greater than or equal to 1"),
        ("loss.margin=0.7", "loss.margin must be below 0.5 for circle (got 0.7)"),
        ("loss.margin=1.5", "loss.margin: Input should be less than 1"),
        ("loss.sample_rate=0", "loss.sample_rate: Input should be greater than 0"),
        ("model.arch=vgg16", "model.arch: unknown backbone 'vgg16'; choose one of resnet18, resnet34, resnet50, resnet101, "
         "resnet18_ibn_a"),
        ("loss.label_smoothing=1.2", "loss.label_smoothing: Input should be less than 1"),
        ("loss.pairwise={name: triplet, weight: 0}", "loss.pairwise.weight: Input should be greater than 0"),
        ("loss.pairwise={name: circle, margin: 0.6}", "loss.pairwise.margin must be below 0.5 for circle (got 0.6)"),
        ("loss.pairwise={name: triplet}", "loss.pairwise (triplet) needs several images of each identity in a batch: "
         "set input.sampler: identity"),
        ("train.freeze_backbone_epochs=5", "train.freeze_backbone_epochs (5) must be below train.epochs (5)"),
        ("train.optimizer=lamb", "train.optimizer: Input should be 'sgd', 'adam' or 'adamw'"),
        ("model.pooling=max", "model.pooling: Input should be 'avg' or 'gem'"),
        ("evaluation.aqe_k=-1", "evaluation.aqe_k: Input should be greater than or equal to 0"),
        ("train.warmup_epochs=9", "train.warmup_epochs (9) must be below train.epochs (5)"),
        ("evaluation.protocol=viper", "evaluation.protocol: Input should be 'market', 'cuhk03' or 'no_camera'"),
        ("evaluation.memory_mb=0", "evaluation.memory_mb: Input should be greater than 0"),
        ("scaling.num_workers=0", "scaling.num_workers: the number of workers must be at least 1"),
        ("scaling.num_workers=[0,2]", "scaling.num_workers: the number of workers must be at least 1, and a range "
         "[MIN, MAX] must have MIN <= MAX (got [0, 2])"),
        ("scaling.num_workers=[3,2]", "a range [MIN, MAX] must have MIN <= MAX (got [3, 2])"),
        ("scaling.num_workers=[1,2,3]", "scaling.num_workers: give a number of workers N or a range [MIN, MAX] of two "
         "integers (got [1, 2, 3])"),
        ("scaling.num_workers=2.5", "scaling.num_workers: give a number of workers N or a range [MIN, MAX] of two "
         "integers (got 2.5)"),
        ("scaling.num_workers=[true,2]", "scaling.num_workers: give a number of workers N"),
        ("scaling.num_workers=[1,4]", "invalid config: scaling.num_workers [1, 4]: 3 workers cannot split the global "
         "batch of 128 (input.batch_size 32 x 4 workers); choose a range whose sizes all divide it, or scaling.elastic_batch: per_worker"),
    ],
)
def test_bad_values_name_file_and_key(override, fragment):
    with pytest.raises(ConfigError) as error:
        load_config(DEMO_CONFIG, [override])
    assert "configs/demo.yaml" in str(error.value)
    assert fragment in str(error.value)


def test_cli_exits_2_with_one_message(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  shards: x\ntrain:\n  lr: -1\n")
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and "train.lr" in err[0]


def test_an_elastic_range_that_cannot_split_identity_batches_is_refused_in_one_line(capsys):
    overrides = ["scaling.num_workers=[2,3]", "input.batch_size=16", "input.sampler=identity", "input.images_per_identity=16"]
    assert main(["train", str(DEMO_CONFIG), *(arg for o in overrides for arg in ("--set", o))]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.endswith("scaling.num_workers [2, 3]: 2 workers cannot split the global batch of 48 (input.batch_size 16 x 3 "
                         "workers) into identity batches of 16; choose a range whose sizes all divide it, or scaling.elastic_batch: "
                         "per_worker")  # fmt: skip


def test_missing_section_and_unreadable_file(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("train:\n  epochs: 2\n")
    with pytest.raises(ConfigError, match=r"empty.yaml: invalid config: data: Field required"):
        load_config(empty)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(DEMO_CONFIG, ["train.epochs"])


def test_relative_paths_and_sqlite_uri_become_absolute(tmp_path):
    cfg = load_config(DEMO_CONFIG).with_absolute_paths(tmp_path)
    assert cfg.data.shards == tmp_path / "data/demo/shards"
    assert cfg.tracking.uri == f"sqlite:///{tmp_path}/mlflow.db"


def test_cli_help_lists_every_subcommand(capsys):
    import subprocess
    import sys

    reid = Path(sys.executable).parent / "reid"  # the installed entry point
    top = subprocess.run([reid, "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("train", "data", "eval", "models", "embed", "export", "cluster", "submit", "jobs", "mlflow"):
        assert command in top
    for sub in (["data", "synth"], ["data", "pack"], ["models", "pull"], ["models", "list"], ["models", "promote"],
                ["train"], ["eval"], ["embed"], ["export", "onnx"], ["cluster", "start"], ["submit"],
                ["jobs", "logs"], ["mlflow", "serve"]):  # fmt: skip
        with pytest.raises(SystemExit):
            main([*sub, "--help"])
        assert "usage: reid " + " ".join(sub) in capsys.readouterr().out


def test_a_config_inherits_from_its_base_deep_merged(tmp_path, capsys):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "base.yaml").write_text("data:\n  shards: x\ninput:\n  height: 64\n  width: 32\ntrain:\n  epochs: 7\n")
    (tmp_path / "recipes" / "child.yaml").write_text("base: ../base.yaml\ninput:\n  width: 48\nloss:\n  scale: 32\n")
    cfg = load_config(tmp_path / "recipes" / "child.yaml", ["train.lr=0.2"])
    assert (cfg.input.height, cfg.input.width, cfg.train.epochs, cfg.loss.scale, cfg.train.lr) == (64, 48, 7, 32.0, 0.2)
    assert main(["config", "show", str(tmp_path / "recipes" / "child.yaml"), "--set", "train.epochs=9"]) == 0
    shown = capsys.readouterr().out
    (tmp_path / "shown.yaml").write_text(shown)
    assert load_config(tmp_path / "shown.yaml") == load_config(tmp_path / "recipes" / "child.yaml", ["train.epochs=9"])


def test_missing_bases_and_cycles_are_refused_with_the_file_named(tmp_path, capsys):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"b.yaml: base 'a.yaml' makes a cycle of configs: \S*a.yaml -> \S*b.yaml -> \S*a.yaml$"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"nowhere.yaml: cannot read config \(the base of .*c.yaml\)"):
        load_config(tmp_path / "c.yaml")
    assert main(["config", "show", str(tmp_path / "c.yaml")]) == 2
    assert "nowhere.yaml" in capsys.readouterr().err


def test_an_elastic_range_needs_as_many_classes_as_its_largest_group(tiny_shards, tiny_dataset):
    too_many = tiny_dataset.num_classes + 1
    cfg = load_config(DEMO_CONFIG, [f"data.shards={tiny_shards}", f"scaling.num_workers=[{too_many},{too_many}]"])
    with pytest.raises(ConfigError, match=rf"^scaling.num_workers: {tiny_dataset.num_classes} classes of .* cannot be "
                                          rf"sharded over {too_many} workers$"):  # fmt: skip
        check_inputs(cfg)
    check_inputs(cfg.model_copy(update={"scaling": cfg.scaling.model_copy(update={"num_workers": (too_many - 1,) * 2})}))


def test_an_elastic_group_keeps_the_global_batch_or_each_workers_batch():
    cfg = load_config(DEMO_CONFIG, ["scaling.num_workers=[1,2]"])
    per_worker = cfg.input.batch_size
    assert [cfg.on_workers(size).input.batch_size for size in (1, 2)] == [per_worker * 2, per_worker]
    assert cfg.on_workers(2) is cfg and cfg.global_batch_size == per_worker * 2
    # per_worker accepts any range (3 workers could not split 4 workers' global batch) and changes nothing
    cfg = load_config(DEMO_CONFIG, ["scaling.num_workers=[1,4]", "scaling.elastic_batch=per_worker"])
    assert all(cfg.on_workers(size) is cfg for size in range(1, 5))
