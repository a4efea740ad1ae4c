"""soupkit.zoo.sources: a zoo made elsewhere (model-soups files, a sweep folder) behind the embedded zoo's interface."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from soupkit.errors import MissingInputError, ResumeError, SoupkitError
from soupkit.zoo.clip import build_model_soups_model, create_clip, register_model_config
from soupkit.experiments.run import RunSpec, run_method
from soupkit.pool.formats import save_state_dict
from soupkit.zoo.sources import ExternalZoo, SourceSpec, open_zoo, prepare_zoo

TINY = "soupkit-test-sources-vit-quickgelu"
TINY_CFG = {"embed_dim": 16, "quick_gelu": True,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
            "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}}
CLASSES = ("n01", "n02", "n03")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Three model-soups-style checkpoints (model_i.pt with the text tower removed) and an ImageNet folder."""
    root = tmp_path_factory.mktemp("src")
    register_model_config(TINY, TINY_CFG, root / "configs")
    rng = np.random.default_rng(0)
    for split, count in (("train", 28), ("val", 4)):  # 26 per class are held out
        for c in CLASSES:
            (root / "imagenet" / split / c).mkdir(parents=True)
            for j in range(count):
                Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(
                    root / "imagenet" / split / c / f"{j}.png")
    torch.manual_seed(0)
    clip = create_clip(TINY)
    del clip.transformer
    base = {f"model.{k}": v for k, v in clip.state_dict().items()}
    (root / "ckpt").mkdir()
    for i in range(3):
        state = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in base.items()}
        state["classification_head.weight"] = torch.randn(3, 16)
        state["classification_head.bias"] = torch.zeros(3)
        torch.save(state, root / "ckpt" / f"model_{i}.pt")
    return root


def _prepare(tiny, out, **kw):
    args = dict(num_models=3, checkpoint_dir=str(tiny / "ckpt"), dataset="imagenet", num_classes=3,
                data_root=str(tiny / "imagenet"), split_file=str(tiny / "split.json"), arch=TINY, workers=0,
                progress=False)
    return prepare_zoo(out, "model-soups", **{**args, **kw})


def test_model_soups_zoo_is_evaluated_once_and_runs_every_experiment(tiny, tmp_path, monkeypatch):
    zoo = _prepare(tiny, tmp_path / "zoo")
    assert isinstance(zoo, ExternalZoo) and len(zoo.records) == 3
    assert all(0 <= r["heldout_acc"] <= 1 and 0 <= r["test_acc"] <= 1 for r in zoo.records)
    # a second call reads the records instead of evaluating again
    monkeypatch.setattr("soupkit.methods.result.evaluate", lambda *a, **k: pytest.fail("evaluated twice"))
    again = _prepare(tiny, tmp_path / "zoo")
    assert again.records == zoo.records and open_zoo(tmp_path / "zoo").paths == zoo.paths
    monkeypatch.undo()
    loaders = zoo.loaders(heldout_size=6, batch_size=4, select_fraction=0.5)
    assert sum(len(y) for _, y in loaders["learn"]) == 3 and sum(len(y) for _, y in loaders["select"]) == 3
    x, _ = next(iter(loaders["test"]))
    assert x.shape[1:] == (3, 32, 32)
    for method in ("greedy", "mehl+"):
        record = run_method(RunSpec(str(tmp_path / "zoo"), method, str(tmp_path / f"{method}.json"),
                                    batch_size=4, options={"epochs": 1.0} if method == "mehl+" else {}))
        assert record["status"] == "ok" and 0 <= record["test_accuracy"] <= 1


def test_a_changed_checkpoint_is_evaluated_again_and_another_zoo_is_refused(tiny, tmp_path):
    zoo = _prepare(tiny, tmp_path / "zoo")
    state = torch.load(tiny / "ckpt" / "model_1.pt")
    converted = tiny / "ckpt" / "model_1.safetensors"  # a converted file of the same stem takes precedence
    save_state_dict(state, converted)
    try:
        again = _prepare(tiny, tmp_path / "zoo")
        assert again.paths[1] == converted and again.paths[0] == zoo.paths[0]
    finally:
        converted.unlink()
    with pytest.raises(ResumeError, match="another zoo"):  # a ValueError too
        _prepare(tiny, tmp_path / "zoo", num_models=2)


def test_sweep_source_takes_the_sweep_records(tiny, tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    model = build_model_soups_model(3, TINY)
    lines = []
    for i in range(2):
        save_state_dict(model.state_dict(), sweep / f"model_{i:03d}.safetensors")
        lines.append(json.dumps({"index": i, "file": f"model_{i:03d}.safetensors", "finetune_seconds": 10.0 + i,
                                 "hparams": {"lr": 1e-5}}))
    (sweep / "models.jsonl").write_text("\n".join(lines) + "\n")
    zoo = prepare_zoo(tmp_path / "zoo", "sweep", num_models=2, checkpoint_dir=str(sweep), dataset="imagenet",
                      num_classes=3, data_root=str(tiny / "imagenet"), split_file=str(tiny / "split.json"),
                      arch=TINY, workers=0, progress=False)
    assert [r["finetune_seconds"] for r in zoo.records] == [10.0, 11.0]
    assert zoo.pretrained_path is None  # no init.safetensors: θ_0 unknown
    save_state_dict(model.state_dict(), sweep / "init.safetensors")  # the sweep's start point, once it is there
    again = prepare_zoo(tmp_path / "zoo", "sweep", num_models=2, checkpoint_dir=str(sweep), dataset="imagenet",
                        num_classes=3, data_root=str(tiny / "imagenet"), split_file=str(tiny / "split.json"),
                        arch=TINY, workers=0, progress=False)  # the same zoo: θ_0 is not part of its identity
    assert again.pretrained_path == (sweep / "init.safetensors").resolve()
    with pytest.raises(MissingInputError, match="soupkit.zoo.zeroshot"):
        _prepare(tiny, tmp_path / "zoo2", pretrained=str(tmp_path / "zeroshot.safetensors"))
    with pytest.raises(MissingInputError, match="finished models"):  # a FileNotFoundError too
        SourceSpec("sweep", str(sweep), 5, "imagenet", "x", "y").checkpoint_paths()


def test_bad_sources_are_explained(tmp_path):
    with pytest.raises(ValueError, match="source must be one of"):
        prepare_zoo(tmp_path, "hub")
    with pytest.raises(ValueError, match="needs checkpoint_dir and data_root"):
        prepare_zoo(tmp_path, "model-soups")
    with pytest.raises(FileNotFoundError, match="soupkit.zoo.hub"):
        SourceSpec("model-soups", str(tmp_path), 2, "imagenet", "x", "y").checkpoint_paths()
    for bad in (lambda: prepare_zoo(tmp_path, "hub"), lambda: SourceSpec("sweep", "x", 0, "imagenet", "x", "y"),
                lambda: SourceSpec("sweep", "x", 1, "mnist", "x", "y"),
                lambda: SourceSpec("model-soups", str(tmp_path), 2, "imagenet", "x", "y").checkpoint_paths(),
                lambda: prepare_zoo(tmp_path, "model-soups", checkpoint_dir="x", data_root="y")):
        with pytest.raises(SoupkitError):
            bad()


def test_a_given_pretrained_model_reaches_model_stock_and_old_source_files_still_match(tiny, tmp_path):
    theta0 = tiny / "ckpt" / "model_0.pt"  # any checkpoint of the architecture stands in for θ_0 here
    zoo = _prepare(tiny, tmp_path / "zoo", pretrained=str(theta0))
    assert zoo.pretrained_path == theta0.resolve()
    record = run_method(RunSpec(str(tmp_path / "zoo"), "model_stock", str(tmp_path / "ms.json"), batch_size=4))
    assert record["status"] == "ok" and 0 <= record["test_accuracy"] <= 1 and 0 <= record["t_mean"] <= 1
    plain = tmp_path / "plain"
    _prepare(tiny, plain)
    source = json.loads((plain / "source.json").read_text())
    assert source["pretrained"] == ""
    source.pop("pretrained")  # a source.json written before the field existed is the same zoo
    (plain / "source.json").write_text(json.dumps(source))
    assert _prepare(tiny, plain).pretrained_path is None
    record = run_method(RunSpec(str(plain), "task_arithmetic", str(tmp_path / "ta.json"), batch_size=4))
    assert record["status"] == "no pretrained model" and record["test_accuracy"] is None
    assert "pretrained=" in record["note"]
