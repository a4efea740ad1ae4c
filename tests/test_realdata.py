"""soupkit.zoo.realdata on tiny generated directories in the real on-disk layouts."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from soupkit.runtime._compat import import_torchvision
from soupkit.errors import DataError, ParameterError
from soupkit.engine.batches import make_loader
from soupkit.zoo.realdata import (SPLIT_FORMAT, ArrayImageDataset, cifar_splits, clip_transform, dataset_splits,
                                  imagenet_splits, mask_heldout, per_class_heldout, random_heldout, read_cifar,
                                  read_split, write_cifar_dir)

CFG = {"size": (16, 16), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "interpolation": "bicubic",
       "resize_mode": "shortest", "fill_color": 0}
CLASSES = ("n01440764", "n01443537", "n01484850")


def _imagenet_dir(root, per_class=5, val_per_class=2, size=(20, 24)):
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", val_per_class)):
        for c in CLASSES:
            (root / split / c).mkdir(parents=True)
            for j in range(count):
                pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{c}_{j}.png")
    return root


def _cifar_arrays(n, num_classes, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, num_classes, n)


def test_split_rules():
    targets = np.repeat(np.arange(4), 10)
    held = per_class_heldout(targets, 3, seed=1)
    assert np.array_equal(np.bincount(targets[held]), [3, 3, 3, 3]) and np.all(np.diff(held) > 0)
    assert np.array_equal(held, per_class_heldout(targets, 3, seed=1))
    assert not np.array_equal(held, per_class_heldout(targets, 3, seed=2))
    with pytest.raises(DataError, match="cannot hold out 10"):
        per_class_heldout(targets, 10, seed=0)
    assert len(random_heldout(1000, 0.1, seed=0)) == 100
    with pytest.raises(ParameterError):  # a ValueError too
        random_heldout(10, 1.0, seed=0)
    with pytest.raises(DataError, match="3 images but 2 labels"):
        ArrayImageDataset(np.zeros((3, 4, 4, 3), np.uint8), [0, 1])


def test_imagenet_folder_split_saved_and_reread(tmp_path):
    root = _imagenet_dir(tmp_path / "imagenet")
    split_file = tmp_path / "splits" / "imagenet.json"
    data = imagenet_splits(root, clip_transform(CFG), split_file, per_class=2, seed=0)
    assert data.classes == CLASSES
    assert (len(data.train), len(data.heldout), len(data.test)) == (9, 6, 6)
    held, train = set(data.split.heldout), set(data.split.train)
    assert not held & train and held | train == set(range(15))
    targets = np.array(data.train.dataset.targets)
    assert np.array_equal(np.bincount(targets[list(held)]), [2, 2, 2])
    image, label = data.heldout[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and label in (0, 1, 2)
    saved = json.loads(split_file.read_text())
    assert saved["rule"] == "per_class:2" and saved["seed"] == 0 and sorted(saved["heldout"]) == sorted(held)

    again = imagenet_splits(root, clip_transform(CFG), split_file, per_class=2, seed=0)
    assert again.split == data.split
    with pytest.raises(DataError, match=r"imagenet\.json: made for another .*seed=0.*seed=5"):
        imagenet_splits(root, clip_transform(CFG), split_file, per_class=2, seed=5)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "train" / CLASSES[0] / "extra.png")
    with pytest.raises(DataError, match="made for another training set"):
        imagenet_splits(root, clip_transform(CFG), split_file, per_class=2, seed=0)


def test_heldout_split_file_through_the_shared_reader(tmp_path):
    path = tmp_path / "held.json"
    doc = {"format": SPLIT_FORMAT, "rule": "fraction:0.1", "seed": 0, "num_samples": 5, "fingerprint": "f",
           "heldout": [3, 1]}
    path.write_text(json.dumps(doc))
    split = read_split(path)
    assert (split.heldout, split.train, split.num_samples, split.rule) == ((1, 3), (0, 2, 4), 5, "fraction:0.1")
    for heldout in ([1, 1], [5], [-1]):
        path.write_text(json.dumps({**doc, "heldout": heldout}))
        with pytest.raises(DataError, match=r"held\.json: split indices overlap, repeat or fall outside \[0, 5\)"):
            read_split(path)
    for text in ("[1, 2]", "{not json", json.dumps({k: v for k, v in doc.items() if k != "rule"})):
        path.write_text(text)
        with pytest.raises(DataError, match=r"held\.json: (unreadable|a split file holds a JSON object)"):
            read_split(path)
    path.write_text(json.dumps({**doc, "format": "other/1"}))
    with pytest.raises(DataError, match="not a soupkit held-out split"):
        read_split(path)


def test_imagenet_model_soups_mask_file(tmp_path):
    root = _imagenet_dir(tmp_path / "imagenet")
    mask = np.zeros(15, dtype=np.int64)
    mask[[0, 7, 14]] = 1
    np.save(tmp_path / "imagenet_98_idxs.npy", mask)
    data = imagenet_splits(root, clip_transform(CFG), tmp_path / "s.json", mask_file=tmp_path / "imagenet_98_idxs.npy",
                           train_transform=lambda image: "augmented")
    assert data.split.heldout == (0, 7, 14) and data.split.rule == "mask:imagenet_98_idxs.npy"
    # the training transform reaches only the fine-tuning images
    assert data.train[0][0] == "augmented" and isinstance(data.heldout[0][0], torch.Tensor)
    assert isinstance(data.test[0][0], torch.Tensor)
    with pytest.raises(DataError, match=r"imagenet_98_idxs\.npy: mask of shape \(15,\)"):
        mask_heldout(tmp_path / "imagenet_98_idxs.npy", 16)


def test_cifar10_roundtrip_matches_torchvision_reader(tmp_path):
    train, test = _cifar_arrays(50, 10, 0), _cifar_arrays(10, 10, 1)
    names = [f"class{i}" for i in range(10)]
    folder = write_cifar_dir(tmp_path, "cifar10", train, test, names)
    assert sorted(p.name for p in folder.iterdir()) == ["batches.meta", "data_batch_1", "data_batch_2",
                                                        "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]
    images, labels, classes = read_cifar(tmp_path, "cifar10", train=True)
    assert np.array_equal(images, train[0]) and np.array_equal(labels, train[1]) and list(classes) == names

    class Unchecked(import_torchvision().datasets.CIFAR10):  # torchvision's own parser, minus the md5 check
        def _check_integrity(self):
            return True

        def _load_meta(self):
            self.classes = names

    reference = Unchecked(str(tmp_path), train=True)
    assert np.array_equal(reference.data, images) and list(reference.targets) == labels.tolist()
    with pytest.raises(DataError, match="md5 differs"):
        read_cifar(tmp_path, "cifar10", train=True, verify_md5=True)


def test_cifar100_split_and_loader(tmp_path):
    write_cifar_dir(tmp_path, "cifar100", _cifar_arrays(40, 100, 0), _cifar_arrays(8, 100, 1),
                    [f"c{i}" for i in range(100)])
    data = dataset_splits("cifar100", tmp_path, clip_transform(CFG), tmp_path / "split.json", seed=3,
                       train_transform=lambda image: "augmented")
    assert data.train[0][0] == "augmented" and isinstance(data.heldout[0][0], torch.Tensor)
    assert (len(data.train), len(data.heldout), len(data.test)) == (36, 4, 8) and len(data.classes) == 100
    assert data.split.rule == "fraction:0.1" and data.split == cifar_splits(
        tmp_path, "cifar100", clip_transform(CFG), tmp_path / "split.json", seed=3).split
    data = dataset_splits("cifar100", tmp_path, clip_transform(CFG), tmp_path / "split.json", seed=3)
    images, labels = next(iter(make_loader(data.train, 8, shuffle=True, seed=0)))
    assert images.shape == (8, 3, 16, 16) and labels.dtype == torch.int64
    order = [lab.tolist() for _, lab in make_loader(data.train, 8, shuffle=True, seed=0)]
    assert order == [lab.tolist() for _, lab in make_loader(data.train, 8, shuffle=True, seed=0)]


def test_cifar_pickles_from_numpy1_load_and_code_is_refused(tmp_path):
    write_cifar_dir(tmp_path, "cifar10", _cifar_arrays(5, 10, 0), _cifar_arrays(5, 10, 1), list("abcdefghij"))
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(batch.read_bytes().replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert read_cifar(tmp_path, "cifar10", train=True)[0].shape == (5, 32, 32, 3)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    batch.write_bytes(pickle.dumps({"data": Evil()}, protocol=2))
    with pytest.raises(DataError, match=r"data_batch_1: not a CIFAR batch \(refusing to load \w+\.print\)"):
        read_cifar(tmp_path, "cifar10", train=True)
    with pytest.raises(DataError, match="missing"):
        read_cifar(tmp_path / "nowhere", "cifar10", train=True)
