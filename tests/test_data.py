"""Data: real Fashion-MNIST, ImageFolder of mixed images, deterministic splits, preprocessing."""

import gzip

import numpy as np
import pytest
import torch
from PIL import Image

from edgekd.data import Preprocess, augment_batch, iterate, load_dataset
from edgekd.errors import EdgekdError
from needs import needs_fmnist



@needs_fmnist
def test_fashion_mnist_is_real_and_split_deterministically():
    a = load_dataset("fashion-mnist", seed=0)
    assert (len(a.train), len(a.val), len(a.test)) == (54000, 6000, 10000)
    assert a.train.images.shape[1:] == (1, 28, 28) and a.train.images.dtype == torch.uint8
    assert torch.bincount(a.test.labels).tolist() == [1000] * 10  # balanced test set
    b = load_dataset("fashion-mnist", seed=0)
    c = load_dataset("fashion-mnist", seed=1)
    assert torch.equal(a.val.labels, b.val.labels) and not torch.equal(a.val.labels, c.val.labels)


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
    with pytest.raises(EdgekdError, match="apt-get install -y dataset-fashion-mnist"):
        load_dataset("fashion-mnist", root=str(tmp_path))


def test_corrupt_idx_file_is_a_clear_error(tmp_path):
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        with gzip.open(tmp_path / name, "wb") as fh:
            fh.write(b"\x00\x00\x08\x03garbage")
    with pytest.raises(EdgekdError, match="cannot read IDX file"):
        load_dataset("fashion-mnist", root=str(tmp_path))


def _write_folder(root, sizes_modes, classes=("cat", "dog")):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i, (size, mode) in enumerate(sizes_modes):
            arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).convert(mode).save(root / c / f"{i}.png")


def test_imagefolder_mixed_sizes_and_modes_and_a_truncated_file(tmp_path):
    _write_folder(tmp_path, [((40, 30), "RGB"), ((17, 50), "L"), ((64, 64), "RGBA"), ((20, 20), "P")])
    (tmp_path / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00truncated")
    ds = load_dataset("imagefolder", root=str(tmp_path), val_fraction=0.25, store_size=32)
    assert ds.classes == ["cat", "dog"] and ds.channels == 3
    assert len(ds.train) + len(ds.val) + len(ds.test) == 8 and ds.info["test_split_from_train"] == 0.2
    assert ds.info["skipped_files"] == [str(tmp_path / "cat" / "broken.png")]
    assert ds.train.images.shape[1:] == (3, 32, 32)


@pytest.mark.parametrize("layout, needle", [("missing", "not found"), ("empty", "no class sub-folders"), ("one", "only one class"), ("noimages", "no images found")])
def test_imagefolder_bad_layouts(tmp_path, layout, needle):
    root = tmp_path / "d"
    if layout != "missing":
        root.mkdir()
    if layout == "one":
        _write_folder(root, [((8, 8), "RGB")], classes=("only",))
    if layout == "noimages":
        (root / "a").mkdir()
        (root / "b").mkdir()
        (root / "a" / "x.txt").write_text("hi")
    with pytest.raises(EdgekdError, match=needle):
        load_dataset("imagefolder", root=str(root))


def test_preprocess_grey_to_rgb_resize_and_normalise():
    imgs = torch.full((2, 1, 28, 28), 255, dtype=torch.uint8)
    pp = Preprocess(64, 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    x = pp(imgs)
    assert x.shape == (2, 3, 64, 64)
    assert torch.allclose(x, torch.full_like(x, 2.0))


def test_augment_and_sharded_iteration_cover_the_split():
    from edgekd.data import Split

    split = Split(torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 4, 4).contiguous(), torch.arange(10))
    seen = torch.cat([b.labels for r in range(2) for b in iterate(split, 3, shuffle=True, seed=1, rank=r, world=2)])
    assert sorted(seen.tolist()) == list(range(10))
    out, flipped = augment_batch(torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4).repeat(64, 1, 1, 1), "flip", torch.Generator().manual_seed(0))
    assert 10 < int(flipped.sum()) < 54
    assert torch.equal(out[flipped][0, 0, 0], torch.tensor([3, 2, 1, 0], dtype=torch.uint8))


def test_splits_are_stratified_and_deterministic():
    from edgekd.data import Split, stratified_split

    labels = torch.tensor([0] * 90 + [1] * 9 + [2] * 30)  # imbalanced, as users' folders are
    split = Split(torch.arange(len(labels), dtype=torch.uint8).view(-1, 1, 1, 1), labels)
    rest, held = stratified_split(split, 0.2, seed=3)
    assert torch.bincount(held.labels).tolist() == [18, 2, 6] and len(rest) + len(held) == len(split)
    assert set(rest.images.flatten().tolist()).isdisjoint(held.images.flatten().tolist())
    again = stratified_split(split, 0.2, seed=3)[1]
    assert torch.equal(again.images, held.images)


def test_a_tiny_split_still_holds_out_what_the_fraction_asks():
    """10 images in 2 classes at 10%: one image held out (each class's own 0.5 would round to 0,
    leaving no validation set at all), and never more than a class has."""
    from edgekd.data import Split, stratified_split

    split = Split(torch.zeros(10, 1, 2, 2, dtype=torch.uint8), torch.tensor([0] * 5 + [1] * 5))
    rest, held = stratified_split(split, 0.1, seed=0)
    assert (len(rest), len(held)) == (9, 1)
    rest, held = stratified_split(Split(split.images[:3], torch.tensor([0, 1, 2])), 0.9, seed=0)
    assert (len(rest), len(held)) == (0, 3)


def _thirds(path, w=90, h=30):
    """A 90x30 picture: red, green and blue thirds (so a crop, a pad and a stretch all look different)."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 3, 0] = arr[:, w // 3 : 2 * w // 3, 1] = arr[:, 2 * w // 3 :, 2] = 200
    Image.fromarray(arr).save(path)


def _folder_of_thirds(root):
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(4):
            _thirds(root / c / f"{i}.png")


def test_image_folder_is_decoded_once_and_again_when_a_file_changes(tmp_path):
    from edgekd.data.store import Storage

    _folder_of_thirds(tmp_path / "d")
    storage = Storage(30, "crop", str(tmp_path / "cache"), workers=2)
    first = load_dataset("imagefolder", root=str(tmp_path / "d"), store_size=storage)
    assert first.info["cache"]["cache"] == "decoded" and len(list((tmp_path / "cache").glob("*.u8"))) == 1
    again = load_dataset("imagefolder", root=str(tmp_path / "d"), store_size=storage)
    assert again.info["cache"]["cache"] == "hit" and torch.equal(again.train.images, first.train.images)
    one_process = load_dataset("imagefolder", root=str(tmp_path / "d"), store_size=Storage(30, "crop", str(tmp_path / "c1"), workers=1))
    assert torch.equal(one_process.train.images, first.train.images)  # the pool writes the same bytes as one process
    Image.fromarray(np.full((30, 90, 3), 7, np.uint8)).save(tmp_path / "d" / "a" / "0.png")  # same name, new content (size and mtime)
    changed = load_dataset("imagefolder", root=str(tmp_path / "d"), store_size=storage)
    assert changed.info["cache"]["cache"] == "decoded" and len(list((tmp_path / "cache").glob("*.u8"))) == 2
    assert load_dataset("imagefolder", root=str(tmp_path / "d"), store_size=Storage(24, "crop", str(tmp_path / "cache"))).info["cache"]["cache"] == "decoded"


@pytest.mark.parametrize("mode", ["crop", "pad", "stretch"])
def test_non_square_image_keeps_its_aspect_and_the_bundle_runtime_sees_the_same_pixels(tmp_path, mode):
    from edgekd.data.store import Storage
    from edgekd.runtime import preprocessing as rt

    _folder_of_thirds(tmp_path / "d")
    ds = load_dataset("imagefolder", root=str(tmp_path / "d"), store_size=Storage(30, mode, str(tmp_path / "cache")), val_fraction=0.25)
    stored = ds.train.images[0].numpy()  # (3, 30, 30)
    red, green, blue = (stored[k] > 100 for k in range(3))
    if mode == "crop":  # the centre third: all green, no red or blue left
        assert green.all() and not red.any() and not blue.any()
    elif mode == "pad":  # the whole picture, 30x10, on black bars above and below
        assert not stored[:, :10].any() and not stored[:, 20:].any() and red[10:20, :10].all() and blue[10:20, 20:].all()
    else:
        assert red[:, :9].all() and green[:, 11:19].all() and blue[:, 21:].all()
    pre = {**Preprocess(48, 3, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)).to_dict(), "store_size": 30, "resize": mode}
    on_device = rt.load_image(tmp_path / "d" / "a" / "0.png", pre)
    assert np.array_equal(on_device, stored)  # the same uint8 pixels as the build's stored image
    built = Preprocess.from_dict(pre)(torch.from_numpy(stored)[None]).numpy()
    assert np.allclose(rt.preprocess(on_device[None], pre), built, atol=1e-5)  # and the same model input


def test_image_store_reads_the_rows_asked_in_the_order_asked_and_rejects_a_short_file(tmp_path):
    """Rows come back as asked (shuffled, repeated, a slice's run), equal to the array written; a
    row past the end and a cache file of the wrong size are errors, not garbage."""
    from edgekd.data.store import ImageStore

    arr = np.random.default_rng(0).integers(0, 256, (300, 3, 16, 16), dtype=np.uint8)
    path = tmp_path / "a.u8"
    arr.tofile(path)
    store = ImageStore(path, arr.shape)
    for rows in (np.random.default_rng(1).permutation(300)[:97], np.array([5, 5, 4, 299, 0]), np.arange(10, 60), np.array([7])):
        np.testing.assert_array_equal(store.take(rows), arr[rows])
    with pytest.raises(IndexError):
        store.take(np.array([300]))
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(EdgekdError, match="delete it"):
        ImageStore(path, arr.shape)


def test_inference_batches_hold_constant_pixels_so_evaluation_stays_under_training_memory():
    """At 128 px a fixed batch of 256 set a build's peak RSS (2.3 GB, benchmarks/data_scale_results.md);
    the evaluation batch now shrinks with the resolution, and a model's logits do not depend on it."""
    from edgekd.data import Split, eval_batch_size
    from edgekd.models import create_model
    from edgekd.train import predict_logits

    assert [eval_batch_size(s) for s in (28, 64, 128, 224, 512)] == [256, 256, 64, 20, 8]
    torch.manual_seed(0)
    m = create_model("pico_cnn", 10, in_chans=1, input_size=28).eval()
    split = Split(torch.randint(0, 256, (300, 1, 28, 28), dtype=torch.uint8), torch.zeros(300, dtype=torch.long))
    torch.testing.assert_close(predict_logits(m, split, m.preprocess), predict_logits(m, split, m.preprocess, batch_size=7), rtol=1e-4, atol=1e-5)
