"""soupkit.zoo.sweep end to end on a tiny ViT and a tiny CIFAR-10 directory (seconds), and presets/paper.yaml."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from soupkit.methods.result import evaluate
from soupkit.zoo.clip import (build_model_soups_model, create_clip, load_model_soups_checkpoint, load_weights,
                              preprocess_config)
from soupkit.io import sha256_file
from soupkit.pool.checkpoint_pool import CheckpointPool
from soupkit.engine.batches import make_loader
from soupkit.zoo.realdata import clip_transform, dataset_splits, write_cifar_dir
from soupkit.errors import SweepError
from soupkit.engine.schedule import warmup_cosine
from soupkit.zoo.sweep import SweepConfig, main, sample_hparams

TINY = "soupkit-test-sweep-tiny"
TINY_CFG = {  # the tokenizer emits CLIP's full vocabulary, so the zero-shot head needs vocab_size 49408
    "embed_dim": 16, "quick_gelu": True,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 16, "patch_size": 8, "head_width": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}
PRESETS = Path(__file__).resolve().parents[1] / "presets" / "paper.yaml"


@pytest.fixture()
def setup(tmp_path):
    config = tmp_path / f"{TINY}.json"
    config.write_text(json.dumps(TINY_CFG))
    rng = np.random.default_rng(0)
    arrays = [(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n)) for n in (40, 10)]
    write_cifar_dir(tmp_path / "data", "cifar10", arrays[0], arrays[1], [f"class {i}" for i in range(10)])
    base = ["--arch", TINY, "--model-config", str(config), "--dataset", "cifar10", "--root", str(tmp_path / "data"),
            "--epochs", "1", "--batch-size", "8", "--warmup-steps", "2", "--lr-min", "1e-4", "--lr-max", "1e-3",
            "--num-workers", "0", "--device", "cpu", "--no-progress"]
    return tmp_path, base


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "models.jsonl").read_text().splitlines()]


def test_sweep_writes_resumes_and_extends(setup):
    tmp_path, base = setup
    out = tmp_path / "zoo"
    assert main([*base, "--out", str(out), "--k", "2", "--head-init", "zeroshot", "--eval-test"]) == 0
    records = _records(out)
    assert [r["index"] for r in records] == [0, 1] and [r["file"] for r in records] == [
        "model_000.safetensors", "model_001.safetensors"]
    for r in records:  # the record fields of soupkit.zoo's models.jsonl
        assert {"index", "file", "sha256", "hparams", "heldout_acc", "test_acc", "finetune_seconds"} <= set(r)
        assert r["finetune_seconds"] >= 0
        assert r["hparams"]["steps"] == 5 and 1e-4 <= r["hparams"]["lr"] <= 1e-3  # 36 images / batch 8
    assert len(json.loads((out / "split.json").read_text())["heldout"]) == 4  # 10 % of 40

    # the files load strictly into the model-soups layout and form a valid checkpoint pool
    model = build_model_soups_model(10, TINY)
    load_weights(model, load_model_soups_checkpoint(out / "model_000.safetensors"), source="model_000")
    # the record's accuracies are those of the saved file on the split file's held-out (and the test) images
    transform = clip_transform(preprocess_config(create_clip(TINY)))
    data = dataset_splits("cifar10", tmp_path / "data", transform, out / "split.json", seed=0)
    for split, key in ((data.heldout, "heldout_acc"), (data.test, "test_acc")):
        assert evaluate(model, model.state_dict(), make_loader(split, 8)) == records[0][key], key
    pool = CheckpointPool([out / r["file"] for r in records], model=model)
    assert len(pool) == 2
    init = load_model_soups_checkpoint(out / "init.safetensors")
    trained = load_model_soups_checkpoint(out / "model_001.safetensors")
    assert not torch.equal(init["model.visual.proj"], trained["model.visual.proj"])

    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("model_*.safetensors")}
    main([*base, "--out", str(out), "--k", "3", "--head-init", "zeroshot", "--eval-test"])
    assert [r["index"] for r in _records(out)] == [0, 1, 2]
    assert _records(out)[:2] == records  # finished models were skipped, not retrained
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("model_00[01].safetensors")} == mtimes

    # a checkpoint altered after its record was written is retrained
    (out / "model_002.safetensors").write_bytes(b"corrupt")
    main([*base, "--out", str(out), "--k", "3", "--head-init", "zeroshot", "--eval-test"])
    assert _records(out)[2]["sha256"] == sha256_file(out / "model_002.safetensors")

    with pytest.raises(SweepError, match=r"sweep_config\.json: .*lr_max=0\.001 vs 0\.01"):
        main([*base, "--out", str(out), "--k", "3", "--head-init", "zeroshot", "--lr-max", "1e-2"])


def test_hparams_depend_on_seed_and_index_only():
    a = SweepConfig(arch="x", dataset="cifar10", root="r", out="o", k=4)
    b = SweepConfig(arch="x", dataset="cifar10", root="r2", out="o2", k=32)
    assert [sample_hparams(i, a) for i in range(4)] == [sample_hparams(i, b) for i in range(4)]
    assert sample_hparams(0, a) != sample_hparams(1, a)
    lrs = [sample_hparams(i, a)["lr"] for i in range(200)]
    assert a.lr_min <= min(lrs) and max(lrs) <= a.lr_max


def test_warmup_cosine_schedule():
    values = [warmup_cosine(s, 10, 4) for s in range(10)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0] and values[4] == 1.0
    assert values[7] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(x >= y for x, y in zip(values[3:], values[4:]))
    assert warmup_cosine(12, 10, 4) == 0.0  # held at 0 past the end
    assert [warmup_cosine(s, 10, 0, constant=True) for s in range(3)] == [1.0, 1.0, 1.0]


def test_sweep_caps_a_warm_up_longer_than_the_run(setup, monkeypatch):
    """The sweep's one-step run with a 500-step warm-up trains at the full lr (the cap), not lr / 500."""
    seen = []
    real = torch.optim.lr_scheduler.LambdaLR

    def recording(opt, fn):
        seen.append(fn(0))
        return real(opt, fn)

    monkeypatch.setattr(torch.optim.lr_scheduler, "LambdaLR", recording)
    tmp_path, base = setup
    main([*base, "--out", str(tmp_path / "zoo"), "--k", "1", "--warmup-steps", "500", "--max-steps", "1"])
    assert seen == [1.0]



def test_paper_preset_has_the_papers_settings():
    preset = yaml.safe_load(PRESETS.read_text())
    common, nbs = preset["common"], preset["notebooks"]
    assert (common["num_models"], common["model_batch_size"], common["batch_size"], common["epochs"]) == (72, 18, 128, 5.0)
    assert nbs["01_zoo"]["zoo_source"] == "model-soups" and nbs["04_top_models"]["eliminate"] == "0,2,22,42"
    every = [common, *nbs.values()]
    assert not any(str(v).startswith("/") for params in every for v in (params or {}).values())  # no absolute paths


def test_pretrained_file_is_the_start_of_every_model(setup):
    from soupkit.zoo.clip import create_clip
    tmp_path, base = setup
    main([*base, "--out", str(tmp_path / "probe"), "--k", "0"])  # registers the tiny config, trains nothing
    torch.manual_seed(123)
    weights = create_clip(TINY).state_dict()
    torch.save(weights, tmp_path / "clip.pt")
    out = tmp_path / "zoo"
    main([*base, "--out", str(out), "--k", "1", "--pretrained", str(tmp_path / "clip.pt"), "--max-steps", "1"])
    init = load_model_soups_checkpoint(out / "init.safetensors")
    torch.testing.assert_close(init["model.visual.proj"], weights["visual.proj"])
    assert _records(out)[0]["hparams"]["steps"] == 1
