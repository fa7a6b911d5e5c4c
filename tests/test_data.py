from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ufm.core import data as D
from ufm.core.data import DataUnavailable, convert_images, load_ood, load_split, to_float_images
from ufm.core.sampling import train_val_split

from .conftest import needs_shared


@needs_shared
def test_offline_copies_load_as_float_tensors(shared_data):
    tr = load_split("mnist", "train", data_dir=shared_data, limit=100)
    assert tr.x.shape == (100, 1, 28, 28) and tr.x.dtype == torch.float32
    assert 0 <= tr.x.min() and tr.x.max() <= 1
    assert tr.y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]  # official order
    c = load_split("cifar10", "test", data_dir=shared_data, limit=4)
    assert c.x.shape == (4, 3, 32, 32) and c.classes[c.y[0]] == "cat"


@needs_shared
def test_default_data_dir_from_env(shared_data, monkeypatch):
    monkeypatch.setenv("UFM_DATA_DIR", str(shared_data))
    assert D.default_data_dir() == shared_data
    assert len(load_split("fashion-mnist", "test", limit=3)) == 3


@needs_shared
def test_paper_ood_sets(shared_data):
    g = load_ood("mnist", (1, 28, 28), 10, data_dir=shared_data)
    assert g.x.shape == (10, 1, 28, 28) and "cifar10" in g.name
    m = load_ood("cifar10", (3, 32, 32), 10, data_dir=shared_data)
    assert m.x.shape == (10, 3, 32, 32) and "mnist" in m.name
    assert torch.equal(m.x[:, 0], m.x[:, 1])  # grey digits repeated on 3 channels
    with pytest.raises(ValueError, match="out of distribution"):
        load_ood("mnist", (1, 28, 28), 10, source="mnist", data_dir=shared_data)


def test_missing_data_offline_names_dir_and_both_fixes(tmp_path):
    with pytest.raises(DataUnavailable) as e:
        load_split("mnist", "train", data_dir=tmp_path, download=False)
    msg = str(e.value)
    assert str(tmp_path) in msg and "connect to the internet" in msg and "train.npz" in msg and "UFM_DATA_DIR" in msg


def test_failed_download_is_a_clear_error(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    class NoNet:
        def __init__(self, *a, **k):
            raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(tvd, "MNIST", NoNet)
    with pytest.raises(DataUnavailable, match="could not be downloaded.*Name or service"):
        load_split("mnist", "test", data_dir=tmp_path)


def test_chest_xray_without_copy_explains(tmp_path):
    with pytest.raises(DataUnavailable, match="cannot be downloaded automatically"):
        load_split("chest-xray", "train", data_dir=tmp_path)


def test_torchvision_path_used_when_no_npz(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    class Fake:
        def __init__(self, root, train, download):
            assert Path(root) == tmp_path / "torchvision"
            self.data = torch.full((4, 28, 28), 255, dtype=torch.uint8)
            self.targets = torch.tensor([0, 1, 2, 3])
            self.classes = [str(i) for i in range(10)]

    monkeypatch.setattr(tvd, "FashionMNIST", Fake)
    d = load_split("fashion-mnist", "train", data_dir=tmp_path)
    assert d.x.shape == (4, 1, 28, 28) and torch.all(d.x == 1) and d.num_classes == 10


def test_user_npz_pair_and_class_folders(tmp_path):
    from .conftest import write_split
    write_split(tmp_path / "mine", np.zeros((5, 9, 9), np.uint8), np.arange(5) % 2, "train")
    write_split(tmp_path / "mine", np.zeros((3, 9, 9), np.uint8), np.arange(3) % 2, "test")
    assert len(load_split(str(tmp_path / "mine"), "train")) == 5
    assert len(load_split(str(tmp_path / "mine" / "test.npz"), "test")) == 3

    root = tmp_path / "xrays"
    for cls, val in (("normal", 10), ("pneumonia", 200)):
        (root / cls).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(np.full((16, 16), val, np.uint8)).save(root / cls / f"{i}.png")
    tr, te = load_split(str(root), "train"), load_split(str(root), "test")
    assert len(tr) == 8 and len(te) == 2 and tr.classes == ("normal", "pneumonia")
    assert tr.x.shape[1:] == (1, 16, 16)
    for d in (tr, te):  # labels follow the folders
        assert torch.all((d.x.mean((1, 2, 3)) > 0.5) == (d.y == 1))


def test_unknown_dataset_and_bad_files(tmp_path):
    with pytest.raises(DataUnavailable, match="unknown dataset"):
        load_split("imagenet", "train", data_dir=tmp_path)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "train.npz").write_bytes(b"garbage")
    with pytest.raises(DataUnavailable, match="could not read"):
        load_split(str(tmp_path / "broken"), "train")


def test_to_float_and_convert():
    x = np.array([[[0, 255]]], np.uint8)
    np.testing.assert_allclose(to_float_images(x).numpy(), [[[[0.0, 1.0]]]])
    rgb = torch.zeros(1, 3, 4, 4)
    rgb[:, 1] = 1.0
    grey = convert_images(rgb, 1, (2, 2))
    assert grey.shape == (1, 1, 2, 2) and torch.allclose(grey, torch.full_like(grey, 0.587))


def test_train_val_split_seeded_and_keeps_canaries():
    tr, va = train_val_split(100, 0.2, exclude=[3, 7], seed=1)
    assert len(va) == 20 and len(tr) == 80 and 3 in tr and 7 in tr
    assert set(tr).isdisjoint(va)
    np.testing.assert_array_equal(va, train_val_split(100, 0.2, exclude=[3, 7], seed=1)[1])
    assert not np.array_equal(va, train_val_split(100, 0.2, seed=2)[1])


def test_train_val_split_canaries_only_displace():
    """The split is a function of the seed; a canary only ever pushes itself out of validation."""
    tr0, va0 = train_val_split(200, 0.1, seed=3)
    outside = [i for i in range(200) if i not in set(va0)]
    # canaries in the clean training part: the split is unchanged
    for ex in ([outside[0]], [outside[5]], outside[:7]):
        tr, va = train_val_split(200, 0.1, exclude=ex, seed=3)
        np.testing.assert_array_equal(va, va0)
        np.testing.assert_array_equal(tr, tr0)
    # a canary drawn for validation is replaced by the next image of the permutation only
    inside = int(va0[0])
    tr, va = train_val_split(200, 0.1, exclude=[inside], seed=3)
    assert inside in tr and inside not in va and len(va) == 20
    assert len(set(va) - set(va0)) == 1 and set(va0) - set(va) == {inside}
    with pytest.raises(ValueError, match="outside"):
        train_val_split(10, 0.2, exclude=[10])


def test_available_offline(tmp_path):
    from .conftest import write_split
    from ufm.core.data import available_offline
    assert available_offline(tmp_path) == []
    write_split(tmp_path / "mnist", np.zeros((2, 4, 4), np.uint8), np.array([0, 1]), "train")
    assert available_offline(tmp_path) == []  # test split missing
    write_split(tmp_path / "mnist", np.zeros((2, 4, 4), np.uint8), np.array([0, 1]), "test")
    assert available_offline(tmp_path) == ["mnist"]


def test_pneumoniamnist_from_medmnist_file_and_offline_error(tmp_path, monkeypatch):
    from ufm.core import data as D
    with pytest.raises(DataUnavailable, match="switched off"):
        load_split("pneumoniamnist", "train", data_dir=tmp_path, download=False)
    import torchvision.datasets.utils as U

    def no_net(*a, **k):
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(U, "download_url", no_net)
    with pytest.raises(DataUnavailable, match="could not be downloaded.*Name or service"):
        load_split("pneumoniamnist", "test", data_dir=tmp_path)
    folder = tmp_path / "pneumoniamnist"
    folder.mkdir()
    np.savez(folder / "pneumoniamnist.npz", train_images=np.full((6, 28, 28), 255, np.uint8),
             train_labels=np.array([[0], [1], [1], [0], [1], [0]]), val_images=np.zeros((1, 28, 28), np.uint8),
             val_labels=np.zeros((1, 1)), test_images=np.zeros((2, 28, 28), np.uint8), test_labels=np.array([[1], [0]]))
    tr = load_split("pneumoniamnist", "train", data_dir=tmp_path)
    assert tr.x.shape == (6, 1, 28, 28) and tr.y.tolist() == [0, 1, 1, 0, 1, 0]
    assert tr.classes == ("normal", "pneumonia") and torch.all(tr.x == 1)
    assert load_split("pneumoniamnist", "test", data_dir=tmp_path).y.tolist() == [1, 0]
    assert "pneumoniamnist" in D.available_offline(tmp_path)


# ------------------------------------------------------------------- labels and bad images

def _npz_pair(root: Path, y_train, y_test, classes=("a", "b")) -> Path:
    from .conftest import write_split
    write_split(root, np.zeros((len(y_train), 6, 6), np.uint8), np.asarray(y_train), "train", np.array(classes))
    write_split(root, np.zeros((len(y_test), 6, 6), np.uint8), np.asarray(y_test), "test", np.array(classes))
    return root


@pytest.mark.parametrize("y, msg", [
    ([0, 1, 5, 1], r"label 5 at index 2 \(1 bad in all\) is outside 0..1 \(classes a, b\)"),
    ([0, -1, 1, -1], r"label -1 at index 1 \(2 bad in all\) is outside 0..1"),
    ([0.0, 1.5, 1.0, 0.0], r"labels y must be integers.*int64"),
])
def test_npz_labels_outside_the_class_list_are_refused(tmp_path, y, msg):
    root = _npz_pair(tmp_path / "d", y, [0, 1])
    with pytest.raises(DataUnavailable, match=msg):
        load_split(str(root), "train")
    assert load_split(str(root), "test").y.tolist() == [0, 1]


def test_whole_float_labels_and_labels_without_classes():
    assert D.check_labels(np.array([0.0, 2.0]), ("a", "b", "c"), "x").dtype == np.int64
    assert D.check_labels(np.array([3, 0]), None, "x").tolist() == [3, 0]
    with pytest.raises(DataUnavailable, match="non-negative integers"):
        D.check_labels(np.array([0, -2]), None, "x")
    with pytest.raises(DataUnavailable, match="1-D"):
        D.check_labels(np.zeros((2, 2), np.int64), None, "x")


def _class_folders(base: Path, classes, n=3, side=8) -> None:
    for i, c in enumerate(classes):
        (base / c).mkdir(parents=True)
        for k in range(n):
            Image.fromarray(np.full((side, side), 40 * i + k, np.uint8)).save(base / c / f"{k}.png")


def test_test_split_with_other_classes_is_refused_naming_both(tmp_path):
    from ufm.core.experiment import ExperimentConfig, prepare_data
    from ufm.core.features import glyph

    root = tmp_path / "folders"
    _class_folders(root / "train", ["cat", "dog"], n=12)
    _class_folders(root / "test", ["cat", "dog", "fox"])
    test = load_split(str(root), "test")
    assert test.classes == ("cat", "dog", "fox") and test.y.max() == 2
    config = ExperimentConfig(feature=glyph("A", size=2, offset=(0, 0)), dataset=str(root), train_size=20,
                              device="cpu")
    with pytest.raises(DataUnavailable, match=r"test split .* has classes \[cat, dog, fox\] but the training "
                                              r"split has \[cat, dog\].*same sub-folder names"):
        prepare_data(config)


@pytest.mark.parametrize("bad", ["corrupt", "truncated", "bomb"])
@pytest.mark.parametrize("first", [True, False])
def test_bad_image_in_class_folder_is_one_message(tmp_path, bad, first):
    from .test_imageio import bomb_png

    root = tmp_path / "imgs"
    _class_folders(root, ["a", "b"])
    target = root / "a" / ("0.png" if first else "2.png")  # 0.png is the very first image loaded
    import io
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32), dtype=np.uint8)).save(jpeg, "JPEG")
    target.write_bytes({"corrupt": b"not a png at all", "truncated": jpeg.getvalue()[: len(jpeg.getvalue()) // 3],
                        "bomb": bomb_png(30_000)}[bad])
    expected = {"corrupt": "not an image", "truncated": "is truncated", "bomb": "decompression bomb"}[bad]
    with pytest.raises(DataUnavailable, match=expected) as e:
        load_split(str(root), "train", limit=None)
        load_split(str(root), "test", limit=None)
    assert str(target) in str(e.value) and f"remove {target}" in str(e.value)


def test_stratified_subset_keeps_every_class_in_proportion_and_is_seeded(tmp_path):
    from ufm.core.sampling import stratified_indices

    y = np.repeat([0, 1, 2], [600, 300, 100])  # stored sorted by class, as the chest X-rays are
    idx = stratified_indices(y, 100, seed=0)
    assert len(idx) == 100 and np.all(np.diff(idx) > 0)
    assert np.bincount(y[idx]).tolist() == [60, 30, 10]  # the first 100 would be all class 0
    assert np.array_equal(idx, stratified_indices(y, 100, seed=0))
    assert not np.array_equal(idx, stratified_indices(y, 100, seed=1))
    odd = stratified_indices(y, 7)
    assert len(odd) == 7 and set(y[odd]) == {0, 1, 2}  # rounding never drops a class
    assert np.array_equal(stratified_indices(y, 5000), np.arange(1000))
    with pytest.raises(ValueError, match="smaller than the 3 classes"):
        stratified_indices(y, 2)
    with pytest.raises(ValueError, match="single class"):
        stratified_indices(np.zeros(50, dtype=int), 20)
    # load_split(stratified=True) keeps exactly these images: each image's two pixels spell its index
    i = np.arange(1000)
    np.savez(tmp_path / "train.npz", x=np.stack([i // 256, i % 256], 1).reshape(-1, 1, 2).astype(np.uint8), y=y)
    sub = load_split(str(tmp_path), "train", limit=100, stratified=True)
    pix = (sub.x.view(-1, 2) * 255).round().long()
    assert torch.equal(pix[:, 0] * 256 + pix[:, 1], torch.as_tensor(idx))
