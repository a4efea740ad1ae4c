"""Zoo variants on tiny configs: the ResNet (BatchNorm) architecture, the corrupted task, a shared backbone,
zoo.json files written before the variants existed, and BatchNorm re-estimation after souping."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from soupkit import make_soup
from soupkit.experiments.batchnorm import batchnorm_layers, bn_comparison, reestimate_bn
from soupkit.zoo.embedded_data import TASKS, Corruption, corrupt_images, load_animal_mnist, load_task
from soupkit.methods.result import evaluate
from soupkit.experiments.run import run_methods
from soupkit.zoo.embedded_models import ResNetConfig, ViTConfig, build_classifier, model_config_from_dict
from soupkit.errors import ZooMismatchError
from soupkit.zoo.config import ZooConfig
from soupkit.zoo.build import build_zoo, load_zoo

SMALL = dict(k=2, batch_size=64, pretrain_epochs=1, lp_steps=5, epoch_choices=(1,), max_pretrain=128,
             max_finetune=128, max_eval=100)
TINY_VIT = ZooConfig(model=ViTConfig(width=32, layers=1, heads=2, output_dim=16), **SMALL)
TINY_RESNET = ZooConfig(model=ResNetConfig(width=8, heads=2, output_dim=16), **SMALL)


def _build(path, config, **kw):
    return build_zoo(path, config, progress=False, num_threads=1, **kw)


@pytest.fixture(scope="module")
def resnet_zoo(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("resnet"), TINY_RESNET)


def test_resnet_classifier_has_batchnorm_and_pads_28px_inputs() -> None:
    model = build_classifier(ResNetConfig())
    assert batchnorm_layers(model) and any(k.endswith("running_var") for k in model.state_dict())
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    names = [n for n, _ in model.named_parameters()]
    assert names[0] == "backbone.conv1.weight" and names[-2:] == ["head.weight", "head.bias"]
    with pytest.raises(ValueError, match="multiple of 32"):
        build_classifier(ResNetConfig(padded_size=30))


def test_model_config_round_trip() -> None:
    for cfg in (ViTConfig(width=48), ResNetConfig(layers=(1, 2, 1, 1))):
        assert model_config_from_dict(json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg


def test_resnet_zoo_builds_loads_and_soups_its_buffers(resnet_zoo, tmp_path) -> None:
    zoo = load_zoo(resnet_zoo.out_dir)
    assert zoo.config == TINY_RESNET and isinstance(zoo.make_model().backbone.bn1, torch.nn.BatchNorm2d)
    a, b = zoo.load_state_dict(0), zoo.load_state_dict(1)
    key = "backbone.bn1.running_mean"
    assert not torch.equal(a[key], b[key])  # fine-tuning moved the statistics differently
    records = run_methods(zoo.out_dir, tmp_path / "runs", ["uniform", "mehl+"], isolate=False, progress=False,
                          heldout_size=50, options={"mehl+": {"epochs": 1.0, "model_batch_size": 1}})
    from soupkit.methods.result import SoupResult  # noqa: PLC0415

    # each record's test accuracy is its saved soup's on every test image of the zoo (BN in eval mode)
    tx, ty = zoo.tensors("test")
    test = [(tx[i:i + 500], ty[i:i + 500]) for i in range(0, len(ty), 500)]
    for r in records:
        saved = SoupResult.load(tmp_path / "runs" / r["method"].replace("+", "_plus"))
        assert r["test_images"] == len(ty) and evaluate(zoo.make_model(), saved, test) == r["test_accuracy"]
    uniform = SoupResult.load(tmp_path / "runs" / "uniform").state_dict
    assert torch.allclose(uniform[key], (a[key] + b[key]) / 2)  # the buffer is souped like the weights


def test_corrupted_task_is_deterministic_and_differs() -> None:
    clean, labels = load_task("animal_mnist")
    hard, hard_labels = load_task("animal_mnist_corrupted")
    assert TASKS == ("animal_mnist", "animal_mnist_corrupted")
    assert hard.shape == clean.shape and hard.dtype == np.uint8 and np.array_equal(labels, hard_labels)
    assert np.abs(hard.astype(int) - clean).mean() > 10
    again = corrupt_images(load_animal_mnist()[0][:50])
    assert np.array_equal(again, corrupt_images(load_animal_mnist()[0][:50]))
    assert not np.array_equal(again, corrupt_images(load_animal_mnist()[0][:50], Corruption(seed=1)))
    with pytest.raises(ValueError, match="unknown task"):
        load_task("cifar")


def test_task_changes_the_data_not_the_pretraining(tmp_path) -> None:
    plain = _build(tmp_path / "plain", TINY_VIT)
    hard_config = dataclasses.replace(TINY_VIT, task="animal_mnist_corrupted")
    hard = _build(tmp_path / "hard", hard_config)
    assert not torch.equal(plain.tensors("test", 20)[0], hard.tensors("test", 20)[0])
    assert torch.equal(plain.tensors("test", 20)[1], hard.tensors("test", 20)[1])
    # Same pre-training: a shared backbone gives byte-identical files to pre-training again.
    shared = _build(tmp_path / "shared", hard_config, pretrained_from=plain.out_dir)
    for name in ["backbone.safetensors", "model_000.safetensors", "model_001.safetensors"]:
        assert (shared.out_dir / name).read_bytes() == (hard.out_dir / name).read_bytes(), name
    with pytest.raises(ZooMismatchError, match="pretrain_epochs"):
        _build(tmp_path / "other", dataclasses.replace(hard_config, pretrain_epochs=2), pretrained_from=plain.out_dir)
    with pytest.raises(ZooMismatchError, match="task"):
        _build(tmp_path / "plain", hard_config)


def test_zoo_json_without_new_keys_loads_and_resumes(tmp_path) -> None:
    _build(tmp_path, TINY_VIT)
    info = json.loads((tmp_path / "zoo.json").read_text())
    del info["config"]["task"]  # as written before tasks existed
    (tmp_path / "zoo.json").write_text(json.dumps(info))
    assert load_zoo(tmp_path).config == TINY_VIT
    zoo = _build(tmp_path, dataclasses.replace(TINY_VIT, k=3))  # resumes: no mismatch, one more model
    assert len(zoo.records) == 3


def test_reestimate_bn_recomputes_statistics(resnet_zoo) -> None:
    model = resnet_zoo.make_model()
    state = resnet_zoo.load_state_dict(0)
    x, _ = resnet_zoo.tensors("finetune", 100)
    fresh = reestimate_bn(model, state, x, batch_size=50)
    assert set(fresh) == set(state)
    changed = {k for k in state if not torch.equal(state[k], fresh[k])}
    assert changed and all(k.split(".")[-1] in {"running_mean", "running_var", "num_batches_tracked"} for k in changed)
    # The statistics are the data's: the stem's first BatchNorm sees conv1 outputs, computable by hand.
    net = resnet_zoo.make_model()
    net.load_state_dict(state)
    with torch.no_grad():
        h = net.backbone.conv1(torch.nn.functional.pad(x, (2, 2, 2, 2), value=-0.2728 / 0.4056))
    assert torch.allclose(fresh["backbone.bn1.running_mean"], h.mean(dim=(0, 2, 3)), atol=1e-5)
    # Independent of the statistics it starts from, and leaves its inputs alone.
    scrambled = {**state, "backbone.bn1.running_mean": state["backbone.bn1.running_mean"] + 5}
    assert torch.equal(reestimate_bn(model, scrambled, x, batch_size=50)["backbone.bn1.running_mean"],
                       fresh["backbone.bn1.running_mean"])
    assert torch.equal(resnet_zoo.load_state_dict(0)["backbone.bn1.running_mean"], state["backbone.bn1.running_mean"])


def test_bn_comparison_rows(resnet_zoo, tmp_path) -> None:
    run_methods(resnet_zoo.out_dir, tmp_path, ["best", "uniform", "ensemble"], isolate=False, progress=False,
                heldout_size=50)
    table = bn_comparison(resnet_zoo, tmp_path, ["best", "uniform", "ensemble"], n=100)
    assert list(table["method"]) == ["best", "uniform"]  # the ensemble has no soup to re-estimate
    assert table.filter(like="(%)").apply(lambda c: c.between(0, 100)).all().all()
    for method, row in table.set_index("method").iterrows():
        record = json.loads((tmp_path / f"{method}.json").read_text())
        # the souped column is the run's own soup on the same test images: the record's accuracy
        assert row["test souped (%)"] == pytest.approx(100 * record["test_accuracy"], abs=1e-6), method
        assert row["test change (points)"] == pytest.approx(row["test re-estimated (%)"] - row["test souped (%)"])
        for name in ("test souped", "test re-estimated"):
            assert row[f"{name} low (%)"] <= row[f"{name} (%)"] <= row[f"{name} high (%)"], (method, name)
        assert row["test change low (points)"] <= row["test change (points)"] <= row["test change high (points)"]


def test_make_soup_on_resnet_pool_handles_bn(resnet_zoo) -> None:
    model = resnet_zoo.make_model()
    x, y = resnet_zoo.tensors("heldout", 50)
    loader = [(x, y)]
    result = make_soup("learned+", model, [resnet_zoo.load_state_dict(i) for i in range(2)], loader, epochs=1.0,
                       progress=False)
    # BatchNorm statistics are mixed with the coefficients of their module's first parameter (the weight)
    states = [resnet_zoo.load_state_dict(i) for i in range(2)]
    c = result.coefficients[:, result.layer_names.index("backbone.bn1.weight")]
    for buffer in ("running_mean", "running_var"):
        key = f"backbone.bn1.{buffer}"
        expected = sum(c[i] * s[key].double() for i, s in enumerate(states)).float()
        assert torch.allclose(result.state_dict[key], expected, atol=1e-5), key
    assert torch.equal(result.state_dict["backbone.bn1.num_batches_tracked"],
                       states[0]["backbone.bn1.num_batches_tracked"])  # integer buffers: the first model's
    # evaluation runs the souped weights and buffers in eval mode (BatchNorm on the souped running statistics)
    logits = torch.func.functional_call(model.eval(), result.state_dict, (x,))
    assert evaluate(model, result, loader) == int((logits.argmax(1) == y).sum()) / len(y)
