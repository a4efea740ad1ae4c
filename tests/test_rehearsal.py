"""The rehearsal preset: the same notebooks and keys as the paper preset, and stand-ins that soupkit's own readers
(realdata, hub, sources) accept in their real on-disk formats."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from soupkit.experiments import rehearsal, runner
from soupkit.runtime._compat import MODEL_CONFIGS_ENV, import_open_clip, import_torchvision
from soupkit.zoo.clip import TEXT_LEFTOVER_KEYS
from soupkit.zoo.realdata import clip_transform, imagenet_splits, read_cifar

SMALL = rehearsal.Sizes(num_models=2, train_per_class=27, val_per_class=1, cifar_train=50, cifar_test=10)


def test_rehearsal_names_the_paper_presets_notebooks_and_keys():
    paper, rehearsed = runner.load_preset("paper"), runner.load_preset("rehearsal")
    assert set(rehearsed["common"]) == set(paper["common"])
    assert set(rehearsed["notebooks"]) == set(paper["notebooks"])
    for name, params in paper["notebooks"].items():
        assert set(rehearsed["notebooks"][name] or {}) == set(params or {}), name
    assert rehearsed.get("only") == paper.get("only")
    assert rehearsed["common"]["device"] == "cpu" and paper["common"]["device"] == "cuda"


def test_rehearsal_differs_only_in_paths_sizes_and_device():
    """A value that is neither a path, a size nor the device (a method's setting, a data set) is the paper's; only
    03 and 09 run their soups in the kernel (process start-up would be most of the run on a CPU)."""
    paper, rehearsed = runner.load_preset("paper"), runner.load_preset("rehearsal")
    kept = {"zoo_name", "zoo_source", "dataset", "paper", "tasks", "memory_cap_mb", "target_accuracy",
            "seconds_per_model", "eliminate"}
    for name, params in [("common", paper["common"]), *paper["notebooks"].items()]:
        ours = rehearsed["common"] if name == "common" else rehearsed["notebooks"][name] or {}
        for key in kept & set(params or {}):
            assert ours[key] == params[key], (name, key)
        if "isolate" in (params or {}):
            assert params["isolate"] is True and ours["isolate"] is False and name in ("03_larger_model", "09_resnet")
        if "arch" in (params or {}):  # a reduced-width stand-in of the paper's architecture
            assert ours["arch"] == f"rehearsal-{params['arch']}" and ours["arch"] in rehearsal.ARCHS


def test_out_dir_in_a_preset_value_is_the_run_folder(tmp_path):
    folder = runner.find_notebooks(Path(__file__).parent)
    params = runner.notebook_parameters("rehearsal", "01_zoo", folder, tmp_path / "run")
    expected = tmp_path / "run" / "inputs" / "checkpoints" / "model-soups"
    assert Path(folder, params["checkpoint_dir"]).resolve() == expected
    assert "{out_dir}" not in json.dumps(params)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The stand-ins at small sizes, without the sweeps (slow; their format is the sweep's own, tested there)."""
    out = tmp_path_factory.mktemp("rehearsal")
    configs = rehearsal.write_configs(out / "configs")
    rehearsal._register(configs)
    rehearsal.write_imagenet(out / "imagenet", SMALL.train_per_class, SMALL.val_per_class)
    rehearsal.write_model_soups_release(out / "release", SMALL.num_models, out / "imagenet")
    rehearsal.write_cifar(out / "cifar", SMALL.cifar_train, SMALL.cifar_test)
    rehearsal.write_shifts(out / "shifts")
    return out


def test_checkpoints_download_from_the_local_server_with_the_release_checksums(inputs, tmp_path):
    rehearsal.download_release(inputs / "release", tmp_path / "ckpt", SMALL.num_models)
    sums = json.loads((inputs / "release" / rehearsal.CHECKSUMS_NAME).read_text())
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    assert sorted(manifest) == sorted(sums) == ["model_0.pt", "model_1.pt"]
    for name, digest in sums.items():
        assert manifest[name]["sha256"] == digest == hashlib.sha256((tmp_path / "ckpt" / name).read_bytes()).hexdigest()
        assert manifest[name]["url"].startswith("http://127.0.0.1:")
    state = torch.load(tmp_path / "ckpt" / "model_0.pt", weights_only=True)
    assert set(TEXT_LEFTOVER_KEYS) <= set(state) and not any(k.startswith("model.transformer.") for k in state)
    assert state["classification_head.weight"].shape == (len(rehearsal.WNIDS), 32)
    # a checkpoint that differs from the release is refused by the hub
    (inputs / "release" / "model_1.pt").write_bytes(b"tampered")
    try:
        with pytest.raises(Exception, match="sha256 mismatch|returned non-zero"):
            rehearsal.download_release(inputs / "release", tmp_path / "other", SMALL.num_models)
    finally:
        rehearsal.write_model_soups_release(inputs / "release", SMALL.num_models, inputs / "imagenet")


def test_the_same_bytes_every_run(inputs, tmp_path):
    again = rehearsal.write_model_soups_release(tmp_path / "release", SMALL.num_models, inputs / "imagenet")
    assert again == json.loads((inputs / "release" / rehearsal.CHECKSUMS_NAME).read_text())
    rehearsal.write_cifar(tmp_path / "cifar", SMALL.cifar_train, SMALL.cifar_test)
    rehearsal.write_shifts(tmp_path / "shifts")
    for folder in ("cifar", "shifts"):
        written = sorted(p.relative_to(inputs / folder) for p in (inputs / folder).rglob("*") if p.is_file())
        assert written == sorted(p.relative_to(tmp_path / folder) for p in (tmp_path / folder).rglob("*") if p.is_file())
        for path in written:
            assert (inputs / folder / path).read_bytes() == (tmp_path / folder / path).read_bytes(), path


def test_prepare_zoo_registers_the_downloaded_checkpoints(inputs, tmp_path):
    from soupkit.zoo.sources import prepare_zoo

    rehearsal.download_release(inputs / "release", tmp_path / "ckpt", SMALL.num_models)
    zoo = prepare_zoo(tmp_path / "zoo", "model-soups", num_models=SMALL.num_models,
                      checkpoint_dir=str(tmp_path / "ckpt"), dataset="imagenet", data_root=str(inputs / "imagenet"),
                      split_file=str(tmp_path / "split.json"), shift_root=str(inputs / "shifts"),
                      arch=rehearsal.VIT_B32, workers=0, progress=False,
                      pretrained=str(inputs / "release" / rehearsal.ZEROSHOT_NAME))
    assert zoo.spec.num_classes == len(rehearsal.WNIDS)  # from the heads, not ImageNet's 1000
    # θ_0 stand-in: the start every release file is a perturbation of, in their layout (the pool checks it)
    from soupkit.pool.checkpoint_pool import CheckpointPool

    theta0 = CheckpointPool(zoo.paths, pretrained=zoo.pretrained_path).load_pretrained()
    first = torch.load(zoo.paths[0], weights_only=True)
    assert set(theta0) == set(first) and not torch.equal(theta0["model.visual.proj"], first["model.visual.proj"])
    gap = (first["model.visual.proj"] - theta0["model.visual.proj"]).norm() / theta0["model.visual.proj"].norm()
    assert gap < 0.2  # model 0 is θ_0 + 5 % noise (an unrelated tower would be ~1.4 away)
    assert len(zoo.records) == 2 and all(0 <= r["heldout_acc"] <= 1 for r in zoo.records)
    assert zoo._keeps_text  # read unconverted: the classifier keeps the text leftovers
    x, _ = next(iter(zoo.loaders(batch_size=4)["learn"]))
    assert x.shape == (4, 3, 64, 64)
    # the shift stand-ins, read through the zoo with its eval transform and scored with their class maps
    from soupkit.engine.evaluation import predict
    from soupkit.zoo.shifts import PAPER_SHIFTS, shift_correct

    assert zoo.shift_names() == PAPER_SHIFTS
    model, state = zoo.make_model(), torch.load(tmp_path / "ckpt" / "model_0.pt", weights_only=True)
    for name in PAPER_SHIFTS:
        logits, labels = predict(model, state, zoo.shift_loader(name, eval_batch_size=8))
        info = zoo.shift_info(name)
        assert logits.shape == (len(labels), len(rehearsal.WNIDS)) and int(labels.max()) < info.num_classes
        assert shift_correct(logits, labels, info).shape == labels.shape
    assert zoo.shift_info("objectnet").num_classes == 4 and zoo.shift_info("imagenet_r").num_classes == 6
    # the shift root is not part of the zoo's identity: registering without it is no other zoo, and no re-evaluation
    again = prepare_zoo(tmp_path / "zoo", "model-soups", num_models=SMALL.num_models,
                        checkpoint_dir=str(tmp_path / "ckpt"), dataset="imagenet", data_root=str(inputs / "imagenet"),
                        split_file=str(tmp_path / "split.json"), arch=rehearsal.VIT_B32, workers=0, progress=False)
    assert again.records == zoo.records and again.shift_names() == ()


def test_imagenet_tree_splits_26_per_class_or_by_model_soups_mask(inputs, tmp_path):
    transform = clip_transform({"size": (16, 16), "mean": (0.5,) * 3, "std": (0.25,) * 3, "interpolation": "bicubic",
                                "resize_mode": "shortest"})
    data = imagenet_splits(inputs / "imagenet", transform, tmp_path / "split.json")
    assert data.classes == rehearsal.WNIDS and len(data.heldout) == 26 * 10 and len(data.train) == 10
    assert all(p.endswith(".JPEG") and Path(p).parent.name in rehearsal.WNIDS for p, _ in data.train.dataset.samples)
    modes = {Image.open(p).mode for p, _ in data.train.dataset.samples}
    assert {"RGB", "L", "CMYK"} <= modes and data.heldout[0][0].shape == (3, 16, 16)  # every mode becomes RGB
    images = [data.train.dataset[i][0] for i in range(len(data.train.dataset))]
    assert all(x.shape == (3, 16, 16) for x in images)
    masked = imagenet_splits(inputs / "imagenet", transform, tmp_path / "mask.json",
                             mask_file=inputs / rehearsal.MASK_NAME)
    targets = np.array(masked.train.dataset.targets)
    assert np.array_equal(np.bincount(targets[list(masked.split.heldout)]), [26] * 10)
    assert masked.split.heldout != data.split.heldout  # the mask, not the seeded rule


def test_cifar_pickles_read_as_the_published_files(inputs):
    c10 = inputs / "cifar" / "cifar-10-batches-py"
    with open(c10 / "data_batch_1", "rb") as fh:
        entry = pickle.load(fh, encoding="bytes")  # how the CIFAR page says to read them: keys are bytes
    assert set(entry) == {b"batch_label", b"labels", b"data", b"filenames"} and entry[b"data"].dtype == np.uint8
    raw = (c10 / "test_batch").read_bytes()
    assert raw[:2] == b"\x80\x02" and b"numpy.core.multiarray" in raw  # protocol 2, numpy 1.x class paths
    with open(inputs / "cifar" / "cifar-100-python" / "train", "rb") as fh:
        assert set(pickle.load(fh, encoding="bytes")) == {b"filenames", b"batch_label", b"fine_labels",
                                                          b"coarse_labels", b"data"}
    for name, classes in (("cifar10", 10), ("cifar100", 100)):
        images, labels, names = read_cifar(inputs / "cifar", name, train=True)
        assert images.shape == (SMALL.cifar_train, 32, 32, 3) and len(names) == classes and labels.max() < classes
        base = import_torchvision().datasets.CIFAR10 if name == "cifar10" else import_torchvision().datasets.CIFAR100

        class Unchecked(base):  # torchvision's own parser, minus the md5 checks of the real files
            def _check_integrity(self):
                return True

        Unchecked._load_meta = lambda self: None
        reference = Unchecked(str(inputs / "cifar"), train=True)
        assert np.array_equal(reference.data, images) and list(reference.targets) == labels.tolist()


def test_stand_in_architectures_resolve_by_name_through_the_environment(inputs, monkeypatch):
    import subprocess
    import sys

    code = ("from soupkit.runtime._compat import import_open_clip; m = import_open_clip();"
            f"print({rehearsal.RN101!r} in m.list_models())")
    env = {**os.environ, MODEL_CONFIGS_ENV: str(inputs / "configs")}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "True"
    monkeypatch.setenv(MODEL_CONFIGS_ENV, str(inputs / "missing"))
    with pytest.raises(FileNotFoundError, match=MODEL_CONFIGS_ENV):
        import_open_clip()
