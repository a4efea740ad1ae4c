"""Zoo building on a tiny recipe: files, determinism, resume, interrupted writes, config changes."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from soupkit.zoo import build as zoo_mod
from soupkit.zoo.embedded_data import load_split, to_tensor
from soupkit.zoo.embedded_models import ViTConfig, build_vit_classifier
from soupkit.zoo.config import ZooConfig
from soupkit.errors import ZooMismatchError
from soupkit.zoo.build import build_zoo, load_zoo, sample_hparams

TINY = ZooConfig(
    k=2, model=ViTConfig(width=32, layers=1, heads=2, output_dim=16), batch_size=64,
    pretrain_epochs=1, lp_steps=5, epoch_choices=(1,), max_pretrain=128, max_finetune=128, max_eval=100,
)


def _build(path, config: ZooConfig = TINY, **kw):
    return build_zoo(path, config, progress=False, num_threads=1, **kw)


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("zoo"))


@pytest.fixture
def count_finetunes(monkeypatch):
    """Counts calls of the training loop (pre-training included)."""
    calls = []
    real = zoo_mod._train

    def counting(*args, **kwargs):
        calls.append(kwargs.get("desc"))
        return real(*args, **kwargs)

    monkeypatch.setattr(zoo_mod, "_train", counting)
    return calls


def test_vit_classifier_shapes_and_names() -> None:
    model = build_vit_classifier(ViTConfig())
    names = [n for n, _ in model.named_parameters()]
    assert all(n.startswith("backbone.") for n in names[:-2]) and names[-2:] == ["head.weight", "head.bias"]
    x = torch.randn(3, 1, 28, 28)
    assert model(x).shape == (3, 10)
    assert torch.allclose(model.features(x).norm(dim=-1), torch.ones(3), atol=1e-5)
    rgb = build_vit_classifier(ViTConfig(in_channels=3, num_classes=5))
    assert rgb(torch.randn(2, 3, 28, 28)).shape == (2, 5)


def test_files_and_records(tiny_zoo) -> None:
    out = tiny_zoo.out_dir
    assert {p.name for p in out.iterdir()} == {
        "zoo.json", "models.jsonl", "backbone.safetensors", "model_000.safetensors", "model_001.safetensors"}
    lines = [json.loads(s) for s in (out / "models.jsonl").read_text().splitlines()]
    assert [r["index"] for r in lines] == [0, 1]
    for r in lines:
        assert {"index", "file", "sha256", "hparams", "heldout_acc", "test_acc", "finetune_seconds"} <= set(r)
        assert 0.0 <= r["heldout_acc"] <= 1.0 and 0.0 <= r["test_acc"] <= 1.0 and r["finetune_seconds"] > 0
        assert r["hparams"] == dataclasses.asdict(sample_hparams(TINY, r["index"]))
    assert json.loads((out / "zoo.json").read_text())["config"]["k"] == 2


def test_load_zoo_round_trip(tiny_zoo) -> None:
    zoo = load_zoo(tiny_zoo.out_dir)
    assert zoo.config == TINY and [p.name for p in zoo.paths] == ["model_000.safetensors", "model_001.safetensors"]
    model = zoo.make_model()
    model.load_state_dict(zoo.load_state_dict(1))
    x = to_tensor(load_split("test", n=4)[0])
    assert model(x).shape == (4, 10)


def test_hparams_depend_on_index_not_k() -> None:
    assert sample_hparams(TINY, 5) == sample_hparams(dataclasses.replace(TINY, k=40), 5)
    assert sample_hparams(TINY, 0) != sample_hparams(TINY, 1)
    lr = [sample_hparams(ZooConfig(), i).lr for i in range(32)]
    assert min(lr) >= 1e-4 and max(lr) <= 3e-3


def test_same_config_same_bytes(tiny_zoo, tmp_path) -> None:
    again = _build(tmp_path)
    for name in ["backbone.safetensors", "model_000.safetensors", "model_001.safetensors"]:
        assert (again.out_dir / name).read_bytes() == (tiny_zoo.out_dir / name).read_bytes(), name


def test_resume_keeps_existing_models(tmp_path, count_finetunes) -> None:
    _build(tmp_path)
    stamps = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.glob("*.safetensors")}
    count_finetunes.clear()
    _build(tmp_path)
    assert count_finetunes == []
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.glob("*.safetensors")} == stamps
    # A larger k trains only the new model.
    zoo = _build(tmp_path, dataclasses.replace(TINY, k=3))
    assert len(count_finetunes) == 1 and len(zoo.paths) == 3
    assert (tmp_path / "model_000.safetensors").stat().st_mtime_ns == stamps["model_000.safetensors"][0]


def test_interrupted_write_is_not_a_model(tmp_path, count_finetunes) -> None:
    _build(tmp_path)
    good = (tmp_path / "model_001.safetensors").read_bytes()
    # What a crash can leave: a temp file never renamed, and a checkpoint whose contents changed.
    (tmp_path / "model_001.safetensors.tmp-999").write_bytes(good[: len(good) // 2])
    (tmp_path / "model_001.safetensors").write_bytes(good[: len(good) // 2])
    with pytest.raises(FileNotFoundError, match=r"\[1\]"):
        load_zoo(tmp_path)
    count_finetunes.clear()
    _build(tmp_path)
    assert len(count_finetunes) == 1  # only model 1 is retrained
    assert (tmp_path / "model_001.safetensors").read_bytes() == good
    assert not list(tmp_path.glob("*.tmp-*"))


def test_missing_record_means_retrain(tmp_path, count_finetunes) -> None:
    _build(tmp_path)
    lines = (tmp_path / "models.jsonl").read_text().splitlines()
    (tmp_path / "models.jsonl").write_text(lines[0] + "\n" + lines[1][:20])  # torn last line
    count_finetunes.clear()
    zoo = _build(tmp_path)
    assert len(count_finetunes) == 1 and len(zoo.records) == 2


def test_changed_recipe_is_refused_unless_overwrite(tmp_path) -> None:
    _build(tmp_path)
    other = dataclasses.replace(TINY, search_seed=1)
    with pytest.raises(ZooMismatchError, match="search_seed"):
        _build(tmp_path, other)
    zoo = _build(tmp_path, other, overwrite=True)
    assert zoo.config == other and len(zoo.paths) == 2


def test_build_leaves_global_rng_alone(tmp_path) -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    _build(tmp_path)
    assert torch.equal(torch.rand(3), expected)


def test_config_dict_from_before_tasks_and_architectures_reads_as_defaults() -> None:
    old = json.loads(json.dumps(TINY.to_dict()))
    del old["task"]  # zoo.json files written before the key existed
    assert "arch" not in old["model"]  # a ViT config is serialised as before
    assert ZooConfig.from_dict(old) == TINY and TINY.task == "animal_mnist"
