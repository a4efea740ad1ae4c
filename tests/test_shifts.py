"""Distribution-shift test sets: the embedded zoo's shifted test splits, the paper-scale readers on the rehearsal's
stand-in folders, the scoring rule (class subsets, ObjectNet's groups) and the errors for bad folders."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from soupkit.errors import DataError, MissingInputError, ParameterError, SoupkitError
from soupkit.experiments import rehearsal
from soupkit.experiments.results import paper_table
from soupkit.zoo import shifts
from soupkit.zoo.build import Zoo
from soupkit.zoo.config import ZooConfig
from soupkit.zoo.embedded_data import SHIFTS, elastic_images, load_task
from soupkit.zoo.shifts import PAPER_SHIFTS, ShiftInfo, paper_shift_average, read_shift, shift_correct

WNIDS = rehearsal.WNIDS


# ---- the embedded zoo ------------------------------------------------------------------------------------------
def _zoo(tmp_path: Path, **config) -> Zoo:
    # the shifts need the zoo's config and split file only, not its checkpoints
    return Zoo(tmp_path, ZooConfig(**config), (), {})


def test_embedded_shifts_pair_with_the_test_split_and_are_deterministic(tmp_path):
    zoo = _zoo(tmp_path)
    assert zoo.shift_names() == SHIFTS == ("corrupted", "blur", "elastic")
    tx, ty = zoo.tensors("test")
    for name in zoo.shift_names():
        x, y = zoo.shift_tensors(name)
        assert x.shape == tx.shape and torch.equal(y, ty), name  # same images, same order: results pair up
        assert not torch.equal(x, tx) and torch.equal(zoo.shift_tensors(name)[0], x), name
        assert zoo.shift_info(name) == ShiftInfo(name, 10)
    batches = list(zoo.shift_loader("blur", eval_batch_size=700))
    assert [len(b[1]) for b in batches] == [700, 700, 600]
    assert torch.equal(torch.cat([b[1] for b in batches]), ty)
    with pytest.raises(ParameterError, match="no shift 'fog'"):
        zoo.shift_loader("fog")


def test_a_task_does_not_count_its_own_corruption_as_a_shift(tmp_path):
    assert _zoo(tmp_path, task="animal_mnist_corrupted").shift_names() == ("blur", "elastic")


def test_elastic_warp_of_an_image_depends_on_its_index_only():
    images = load_task("animal_mnist")[0]
    idx = np.array([5, 900, 17, 4000])
    whole = elastic_images(images[idx], idx)
    assert np.array_equal(elastic_images(images[idx[2:]], idx[2:]), whole[2:])
    assert not np.array_equal(elastic_images(images[idx], idx + 1), whole)


# ---- scoring ---------------------------------------------------------------------------------------------------
def test_shift_correct_on_hand_computed_logits():
    plain = ShiftInfo("v2", 3)
    logits = torch.tensor([[1.0, 3.0, 2.0], [5.0, 0.0, 0.0], [2.0, 2.0, 0.0]])
    assert shift_correct(logits, torch.tensor([1, 2, 0]), plain).tolist() == [True, False, True]  # ties: the first
    # a class subset (ImageNet-R/-A): the arg-max within classes 0 and 2, labels are positions in the subset
    subset = ShiftInfo("r", 3, ((0,), (2,)))
    assert shift_correct(logits[:1], torch.tensor([1]), subset).tolist() == [True]  # class 2 beats 0; 1 is out
    assert shift_correct(logits[:1], torch.tensor([0]), subset).tolist() == [False]
    # ObjectNet: the max of each group's logits; a sum would pick the second group here (-5 < 6)
    groups = ShiftInfo("objectnet", 4, ((0, 1), (2, 3)))
    logits = torch.tensor([[5.0, -10.0, 3.0, 3.0], [0.0, 1.0, 3.0, -9.0]])
    assert shift_correct(logits, torch.tensor([0, 1]), groups).tolist() == [True, True]
    assert shift_correct(logits, torch.tensor([1, 0]), groups).tolist() == [False, False]


def test_shift_correct_refuses_mismatched_inputs():
    info = ShiftInfo("objectnet", 4, ((0, 1), (2, 3)))
    with pytest.raises(DataError, match=r"expected \[N, 4\]"):
        shift_correct(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long), info)
    with pytest.raises(DataError, match="labels outside 0..1"):
        shift_correct(torch.zeros(1, 4), torch.tensor([2]), info)
    with pytest.raises(DataError, match="outside the model's"):
        ShiftInfo("r", 3, ((0,), (3,)))


def test_the_paper_shift_numbers_average_as_model_soups_reports():
    table = paper_table("model_soups_shifts_vitb32_imagenet").set_index("method")
    assert table.loc[["best", "uniform", "greedy"], "test_accuracy"].tolist() == [80.39, 79.97, 81.03]
    assert table.loc[["best", "uniform", "greedy"], "shift_average"].tolist() == [47.97, 51.58, 50.86]
    for method, row in table.iterrows():
        assert paper_shift_average(row[list(PAPER_SHIFTS)].to_dict()) == pytest.approx(row["shift_average"], abs=0.01)
        assert row["source"].startswith("mlfoundations/model-soups@"), method
    with pytest.raises(ParameterError, match="objectnet"):
        paper_shift_average({s: 0.5 for s in PAPER_SHIFTS[:4]})


# ---- paper-scale readers on the rehearsal's stand-ins ------------------------------------------------------------
@pytest.fixture(scope="module")
def shift_root(tmp_path_factory):
    return rehearsal.write_shifts(tmp_path_factory.mktemp("shifts"))


def _folder_names(dataset):
    return [Path(p).parent.name for p, _ in dataset.samples]


def test_every_reader_gives_the_classes_of_its_folders(shift_root):
    assert shifts.available_shifts(shift_root) == PAPER_SHIFTS
    v2 = read_shift("imagenet_v2", shift_root, WNIDS)
    assert v2.info.groups is None and v2.targets == [int(f) for f in _folder_names(v2)]
    assert sorted(set(v2.targets)) == list(range(10)) and len(v2) == 10 * rehearsal.SHIFT_PER_CLASS
    sketch = read_shift("imagenet_sketch", shift_root, WNIDS)
    assert sketch.info.groups is None and sketch.targets == [WNIDS.index(f) for f in _folder_names(sketch)]
    for name, classes in (("imagenet_r", rehearsal.IMAGENET_R_CLASSES), ("imagenet_a", rehearsal.IMAGENET_A_CLASSES)):
        data = read_shift(name, shift_root, WNIDS)
        assert data.info.groups == tuple((c,) for c in classes) and data.info.classes == tuple(WNIDS[c] for c in classes)
        # label = the position of the image's wnid in the subset, so groups[label] is its ImageNet class
        assert [data.info.groups[t][0] for t in data.targets] == [WNIDS.index(f) for f in _folder_names(data)]
    x, y = read_shift("imagenet_r", shift_root, WNIDS, transform=lambda im: torch.zeros(3, 4, 4))[0]
    assert x.shape == (3, 4, 4) and y == 0


def test_objectnet_maps_its_classes_to_imagenet_groups_and_crops_the_border(shift_root):
    data = read_shift("objectnet", shift_root, WNIDS)
    mapped = sorted(f for f, (_, ids) in rehearsal.OBJECTNET_CLASSES.items() if ids)
    assert data.info.classes == tuple(mapped) == ("aquarium_fish", "poultry", "ray", "shark")
    assert data.info.groups == ((1,), (7, 8), (5, 6), (2, 3, 4))  # through the permuted 2012 ids
    assert "air_freshener" not in _folder_names(data)  # a folder without an ImageNet class is left out
    assert data.targets == [mapped.index(f) for f in _folder_names(data)]
    raw = np.asarray(Image.open(data.samples[0][0]).convert("RGB"))
    assert (raw[0] == (255, 0, 0)).all() and (raw[:, -1] == (255, 0, 0)).all()  # the red frame on disk
    image = np.asarray(data.load(0))
    assert image.shape == (raw.shape[0] - 4, raw.shape[1] - 4, 3)  # 2 pixels off each side
    assert np.array_equal(image, raw[2:-2, 2:-2]) and not (image == (255, 0, 0)).all(axis=-1).any()


def test_clear_errors_for_missing_folders_and_unknown_classes(shift_root, tmp_path):
    with pytest.raises(MissingInputError, match="imagenet-a"):
        read_shift("imagenet_a", tmp_path, WNIDS)
    with pytest.raises(MissingInputError, match="shift root is missing"):
        shifts.available_shifts(tmp_path / "nowhere")
    with pytest.raises(ParameterError, match="unknown shift"):
        read_shift("imagenet_c", shift_root, WNIDS)
    for name in ("imagenet-r", "imagenetv2-matched-frequency-format-val", "objectnet-1.0"):
        shutil.copytree(shift_root / name, tmp_path / name)
    (tmp_path / "imagenet-r" / "n99999999").mkdir()
    with pytest.raises(DataError, match="n99999999 are not ImageNet wnids"):
        read_shift("imagenet_r", tmp_path, WNIDS)
    with pytest.raises(DataError, match="class indices 0..4"):  # the ImageNet of 5 classes has no folder 9
        read_shift("imagenet_v2", tmp_path, WNIDS[:5])
    with pytest.raises(DataError, match="beyond the zoo's 5 classes"):
        read_shift("objectnet", tmp_path, WNIDS[:5])
    mappings = tmp_path / "objectnet-1.0" / "mappings"
    names = json.loads((mappings / "objectnet_to_imagenet_1k.json").read_text())
    (mappings / "objectnet_to_imagenet_1k.json").write_text(json.dumps({**names, "Ray": "manta ray"}))
    with pytest.raises(DataError, match="'manta ray'"):
        read_shift("objectnet", tmp_path, WNIDS)
    (mappings / "pytorch_to_imagenet_2012_id.json").unlink()
    with pytest.raises(SoupkitError, match="pytorch_to_imagenet_2012_id.json: missing"):
        read_shift("objectnet", tmp_path, WNIDS)
    assert issubclass(MissingInputError, SoupkitError) and issubclass(DataError, SoupkitError)


def test_imagenet_wnids_from_the_train_folder_or_a_file(tmp_path):
    for w in reversed(WNIDS[:3]):
        (tmp_path / "train" / w).mkdir(parents=True)
    assert shifts.imagenet_wnids(tmp_path / "train") == WNIDS[:3]
    (tmp_path / "wnids.txt").write_text("\n".join(WNIDS[:4]) + "\n")
    assert shifts.imagenet_wnids(tmp_path / "wnids.txt") == WNIDS[:4]
    with pytest.raises(MissingInputError):
        shifts.imagenet_wnids(tmp_path / "missing")
