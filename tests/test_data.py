import gzip
import json
import math
import shutil
import struct

import numpy as np
import pytest
import torch

from lookhere.data import DataSpec, FashionMNIST, SyntheticScenes, build_dataset, collate, read_idx, render
from lookhere.data.preview import preview
from conftest import direct_eval_tensor, hr_folder, image_folder


def test_synthetic_is_deterministic_and_resolution_native():
    a, b = SyntheticScenes("train", 32, 50), SyntheticScenes("train", 32, 50)
    for i in range(5):
        x, y = a[i]
        assert torch.equal(x, b[i][0]) and y == b[i][1]
        assert x.shape == (3, 32, 32)
    big = SyntheticScenes("train", 128, 50)
    for i in range(10):
        assert a.scene(i) .label == big.scene(i).label
        # The 32 px image is the 128 px image box-filtered: block averages agree closely.
        lo, hi = a.render(i), big.render(i)
        pooled = hi.reshape(3, 32, 4, 32, 4).mean(axis=(2, 4))
        assert np.abs(pooled - lo).mean() < 0.02


def test_splits_never_share_a_scene():
    scenes = {s: {SyntheticScenes(s, 16, 300).scene(i).cx for i in range(300)} for s in ("train", "val", "test")}
    assert not (scenes["train"] & scenes["val"]) and not (scenes["train"] & scenes["test"])
    assert not (scenes["val"] & scenes["test"])


def test_fine_detail_needs_resolution():
    """A small object's grating is washed out at low resolution and visible at high resolution."""
    ds = SyntheticScenes("train", 32, 400)
    small = next(i for i in range(400) if ds.scene(i).size < 0.15 and ds.scene(i).shape == 1)
    sc = ds.scene(small)

    def stripe_contrast(size):
        img = render(sc, size).mean(0)
        r = int(sc.size * size * 0.3)
        cy, cx = int(sc.cy * size), int(sc.cx * size)
        patch = img[cy - r: cy + r + 1, cx - r: cx + r + 1]
        return float(patch.std())

    assert stripe_contrast(256) > 3 * stripe_contrast(32)


def test_classes_and_sizes():
    ds = SyntheticScenes("train", 16, 2000)
    labels = np.array([ds.scene(i).label for i in range(2000)])
    sizes = np.array([ds.object_size(i) for i in range(2000)])
    assert ds.num_classes == 10 and set(labels) == set(range(10))
    assert sizes.min() >= 0.14 and sizes.max() <= 0.7 and sizes.max() / sizes.min() > 4
    where = SyntheticScenes("train", 16, 500, task="where")
    assert where.num_classes == 4 and {where.scene(i).label for i in range(500)} == set(range(4))


def test_where_marker_lies_on_the_labelled_side_apart_from_the_object():
    """The marker (the only magenta pixels) is whole, inside the image, on the labelled side, and a
    gap of at least 0.04 image sides away from the object's extent."""
    from lookhere.data.synthetic import MARKER, SIDES

    ds = SyntheticScenes("val", 96, 60, task="where")
    for i in range(60):
        sc = ds.scene(i)
        img = ds.render(i)
        magenta = (img[0] > 0.9) & (img[1] < 0.1) & (img[2] > 0.9)
        ys, xs = np.nonzero(magenta)
        assert abs(magenta.sum() - (MARKER * 96) ** 2) <= 4 * MARKER * 96  # whole (edge pixels aside)
        my, mx = (ys.mean() + 0.5) / 96 - sc.cy, (xs.mean() + 0.5) / 96 - sc.cx
        side = SIDES[sc.label]
        along = {"above": -my, "below": my, "left": -mx, "right": mx}[side]
        across = mx if side in ("above", "below") else my
        assert along >= sc.size / 2 + 0.04 + MARKER / 2 - 0.02 and abs(across) < 0.02, (i, side, mx, my)


def test_far_marker_is_whole_in_the_labelled_half_and_the_object_in_the_other():
    """The far task's class is (shape, marker half): the magenta marker lies whole inside the half the
    label names, the object wholly inside the other half; scenes at two sizes are the same scene."""
    from lookhere.data.synthetic import FAR_MARKER, HALVES, SHAPES

    ds = SyntheticScenes("val", 128, 60, task="far")
    assert ds.num_classes == 10
    labels = {ds.scene(i).label for i in range(60)}
    assert labels == set(range(10)), labels
    for i in range(60):
        sc = ds.scene(i)
        shape, half = divmod(sc.label, 2)
        assert SHAPES[shape] == SHAPES[sc.shape]
        img = ds.render(i)
        magenta = (img[0] > 0.9) & (img[1] < 0.1) & (img[2] > 0.9)
        ys, xs = np.nonzero(magenta)
        assert abs(magenta.sum() - (FAR_MARKER * 128) ** 2) <= 4 * FAR_MARKER * 128  # whole (edge pixels aside)
        marker_right = xs.min() >= 64
        assert (xs.max() < 64 or marker_right) and HALVES[half] == ("right" if marker_right else "left"), i
        left, right = sc.cx - sc.size / 2, sc.cx + sc.size / 2
        assert (right <= 0.5 if marker_right else left >= 0.5), (i, left, right)
    small = SyntheticScenes("val", 32, 60, task="far")
    assert all((small.scene(i).label, small.scene(i).marker) == (ds.scene(i).label, ds.scene(i).marker) for i in range(60))


def test_preview_png(tmp_path):
    """The figure has the size preview asks for, and a framed tile per size (row) and scene (column)
    that shows that scene rendered at that size, pixel for pixel."""
    from PIL import Image

    sizes, count = (16, 64), 3
    out = preview(str(tmp_path / "p.png"), sizes=sizes, count=count)
    with Image.open(out) as im:
        assert im.size == (561, 418)  # figsize (1.7 * 3, 1.9 * 2) inches at 110 dpi
        png = np.asarray(im.convert("RGB")).astype(np.float64) / 255
    dark = png.max(-1) < 40 / 255

    def lines(counts, least):
        """Runs of rows (or columns) with at least `least` dark pixels: the frames' edges."""
        idx = np.nonzero(counts >= least)[0]
        return [(run[0], run[-1]) for run in np.split(idx, np.nonzero(np.diff(idx) > 1)[0] + 1)]

    rows, cols = lines(dark.sum(1), dark.shape[1] / 2), lines(dark.sum(0), dark.shape[0] / 2)
    assert len(rows) == 2 * len(sizes) and len(cols) == 2 * count
    ds = SyntheticScenes("train", sizes[0], count)
    for r, size in enumerate(sizes):
        top, bottom = rows[2 * r][1] + 1, rows[2 * r + 1][0]
        ys = (top + (np.arange(size) + 0.5) * (bottom - top) / size).astype(int)
        for i in range(count):
            left, right = cols[2 * i][1] + 1, cols[2 * i + 1][0]
            xs = (left + (np.arange(size) + 0.5) * (right - left) / size).astype(int)
            tile = png[ys][:, xs]  # the centre of each image pixel's block
            want = np.pad(np.clip(ds.render(i, size).transpose(1, 2, 0), 0, 1), ((1, 1), (1, 1), (0, 0)), mode="edge")
            # Blocks of 2-3 screen pixels at 64 px: a centre may land on a neighbour's block.
            err = np.min([np.abs(tile - want[dy:dy + size, dx:dx + size]).max(-1)
                          for dy in range(3) for dx in range(3)], axis=0)
            assert err.max() < 1.5 / 255, (size, i)


def _write_idx(path, array, gz=False):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


def test_fashion_mnist_from_idx(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (30, 28, 28))
    labels = rng.integers(0, 10, 30)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", imgs, gz=True)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels, gz=True)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", imgs[:5])
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels[:5])
    train = FashionMNIST("train", 56, root=str(tmp_path), val_size=10)
    val = FashionMNIST("val", 28, root=str(tmp_path), val_size=10)
    test = FashionMNIST("test", 28, root=str(tmp_path))
    assert (len(train), len(val), len(test)) == (20, 10, 5)
    x, y = val[0]
    assert x.shape == (3, 28, 28) and y == labels[20]
    expected = (imgs[20] / 255.0 - 0.286) / 0.353
    np.testing.assert_allclose(x[0].numpy(), expected, atol=1e-5)
    assert train[0][0].shape == (3, 56, 56)
    np.testing.assert_array_equal(read_idx(tmp_path / "t10k-labels-idx1-ubyte"), labels[:5])


def test_fashion_mnist_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        FashionMNIST("train", 28, root=str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="train-images"):
        FashionMNIST("train", 28, root=str(tmp_path))
    bad = tmp_path / "t10k-images-idx3-ubyte"
    _write_idx(bad, np.zeros((4, 28, 28)))
    bad.write_bytes(bad.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(bad)


def test_fashion_mnist_bad_files_are_named_with_what_is_wrong(tmp_path):
    """An interrupted download, a header cut short, bytes beyond the body and labels outside 0..9 are each
    a clear error naming the file (labels above 9 would fail only later, inside the loss)."""
    images = np.random.default_rng(0).integers(0, 256, (6, 28, 28))
    gz = tmp_path / "train-images-idx3-ubyte.gz"
    _write_idx(gz, images, gz=True)
    whole = gz.read_bytes()
    gz.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.gz: unreadable IDX file .*download it again"):
        read_idx(gz)
    gz.write_bytes(whole[:-8] + bytes(8))  # the gzip trailer (CRC and size) damaged
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.gz: unreadable IDX file .*download it again"):
        read_idx(gz)
    plain = tmp_path / "t10k-images-idx3-ubyte"
    _write_idx(plain, images)
    whole = plain.read_bytes()
    plain.write_bytes(whole[:6])
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte: IDX header cut short"):
        read_idx(plain)
    plain.write_bytes(whole + bytes(8))
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte: size does not match .*8 extra bytes"):
        read_idx(plain)
    root = tmp_path / "fm"
    root.mkdir()
    _write_idx(root / "train-images-idx3-ubyte", images)
    _write_idx(root / "train-labels-idx1-ubyte", np.array([0, 1, 2, 25, 200, 3]))
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte: 2 label\(s\) outside 0..9 \(first: 25\)"):
        FashionMNIST("train", 28, root=str(root), val_size=0)


def test_image_folder_through_timm(tmp_path):
    image_folder(tmp_path)
    spec = DataSpec(f"folder:{tmp_path}", 32)
    train, val = build_dataset(spec, "train"), build_dataset(spec, "val")
    assert len(train) == len(val) == 8 and train.num_classes == 2
    x, y = val[0]
    assert x.shape == (3, 32, 32) and y in (0, 1)
    # Evaluation is deterministic (resize + centre crop); training is augmented.
    assert torch.equal(val[0][0], val[0][0])
    assert not torch.equal(train[0][0], train[0][0])


def test_corrupt_image_is_skipped_and_counted(tmp_path):
    image_folder(tmp_path, corrupt=True)
    train = build_dataset(DataSpec(f"folder:{tmp_path}", 32), "train")
    with pytest.warns(RuntimeWarning, match="skipped unreadable sample"):
        items = [train[i] for i in range(len(train))]
    assert sum(item is None for item in items) == 1
    images, labels, skipped = collate(items)
    assert skipped == 1 and images.shape == (8, 3, 32, 32) and labels.shape == (8,)


def test_hugging_face_dataset_from_local_files(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the 'datasets' package is not installed")
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "validation"):
        imgs = [Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)) for _ in range(6)]
        ds = datasets.Dataset.from_dict({"image": imgs, "label": [0, 1, 2, 0, 1, 2]},
                                        features=datasets.Features({"image": datasets.Image(),
                                                                    "label": datasets.ClassLabel(num_classes=3)}))
        ds.to_parquet(str(tmp_path / f"{split}-00000.parquet"))
    spec = DataSpec(f"hf:{tmp_path}", 16, root=str(tmp_path / "cache"))
    val = build_dataset(spec, "val")
    assert len(val) == 6
    x, y = val[1]
    assert x.shape == (3, 16, 16) and y == 1


def test_a_streamed_hugging_face_split_gives_each_sample_once_an_epoch_in_a_seeded_order(tmp_path):
    pytest.importorskip("datasets", reason="the 'datasets' package is not installed")
    from conftest import hf_parquet

    from lookhere.train import SeededStream

    root = hf_parquet(tmp_path / "hf", train=24, val=6)
    spec = DataSpec(f"hf:{root}", 16, 24, seed=3, root=str(tmp_path / "cache"), streaming=True, batch_size=4)
    train = build_dataset(spec, "train")
    assert train.num_classes == 3 and len(train) == 24
    stream = SeededStream(train, seed=3, rank=0, batch_size=4)

    def epoch(e):
        stream.set_epoch(e)
        torch.manual_seed(0)
        before = torch.get_rng_state()
        samples = list(stream)
        assert torch.equal(torch.get_rng_state(), before)  # the caller's random state is left alone
        return torch.stack([x for x, _ in samples]), [y for _, y in samples]

    images, labels = epoch(0)
    assert images.shape == (24, 3, 16, 16) and sorted(labels) == sorted(i % 3 for i in range(24))
    again, labels_again = epoch(0)
    assert labels_again == labels and torch.equal(again, images)  # order and augmentation: from the seed
    other, labels_other = epoch(1)
    assert sorted(labels_other) == sorted(labels) and not torch.equal(other, images)
    val = build_dataset(spec, "val", train=False)
    assert [y for _, y in val] == [i % 3 for i in range(6)]  # read once, in order, at evaluation

    for bad, message in (
            (dict(), "--data-streaming: split 'train.:50%.' of hf:.* is sliced"),
            (dict(name="synthetic"), "--data-streaming streams hf: datasets; synthetic is not one"),
            (dict(length=None), "records no size for split 'train'; give --data-length")):
        with pytest.raises(ValueError, match=message):
            build_dataset(DataSpec(**{**vars(spec), **bad}), "train" if bad else "train[:50%]")


def test_unknown_dataset():
    with pytest.raises(ValueError, match="allowed: synthetic"):
        build_dataset(DataSpec("imagenet", 32), "train")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_dataset(DataSpec("folder:/nonexistent/x", 32), "train")


@pytest.mark.parametrize("shape", [(48, 48), (40, 56), (60, 44)])
def test_evaluation_transform_is_the_papers(tmp_path, shape):
    """Training size 32 at crop 0.875: shorter side to 36, centre 32; 48 and 24: shorter side to the size."""
    pytest.importorskip("datasets", reason="the 'datasets' package is not installed")
    root = hr_folder(tmp_path / "hr", [shape], [[3]])
    config = {"input_size": (3, 32, 32), "crop_pct": 0.875, "interpolation": "bicubic", "crop_mode": "center",
              "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    for size in (32, 48, 24):
        spec = DataSpec(f"hf:{root}", size, root=str(tmp_path / "cache"), data_config=config)
        x, _ = build_dataset(spec, "test")[0]
        expected = direct_eval_tensor(root / "test" / "0.png", size, 32)
        assert x.shape == (3, size, size)
        torch.testing.assert_close(x, expected, atol=1e-5, rtol=0)


def test_label_lists_of_a_local_imagenet_hr_folder(tmp_path):
    pytest.importorskip("datasets", reason="the 'datasets' package is not installed")
    root = hr_folder(tmp_path / "hr", [(24, 24)] * 3, [[5], [1, 7, 9], [2, 3]])
    cache = str(tmp_path / "cache")
    test = build_dataset(DataSpec(f"hf:{root}", 16, root=cache), "test")
    assert [test[i][1].tolist() for i in range(3)] == [[5, -1, -1], [1, 7, 9], [2, 3, -1]]
    images, labels, skipped = collate([test[i] for i in range(3)])
    assert images.shape == (3, 3, 16, 16) and labels.shape == (3, 3) and skipped == 0
    sliced = build_dataset(DataSpec(f"hf:{root}", 16, root=cache), "test[1:]")
    assert len(sliced) == 2 and sliced[0][1].tolist() == [1, 7, 9]
    with pytest.raises(ValueError, match="split 'val' of hf:.*Unknown split"):
        build_dataset(DataSpec(f"hf:{root}", 16, root=cache), "val")
    with pytest.raises(ValueError, match="lists of valid classes.*training needs one class"):
        build_dataset(DataSpec(f"hf:{root}", 16, root=cache), "test", train=True)


def test_an_empty_label_list_is_refused(tmp_path):
    pytest.importorskip("datasets", reason="the 'datasets' package is not installed")
    root = hr_folder(tmp_path / "hr", [(24, 24)] * 2, [[5], []])
    with pytest.raises(ValueError, match="1 image.* empty 'labels' list .first: row 1"):
        build_dataset(DataSpec(f"hf:{root}", 16, root=str(tmp_path / "cache")), "test")


def test_split_and_folder_messages_name_the_flag(tmp_path):
    with pytest.raises(ValueError, match=r"--split 'train\[99%:\]': synthetic has the splits train, val, test"):
        build_dataset(DataSpec("synthetic", 16), "train[99%:]")
    image_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="has no test/ folder or test.tar .found: train, val.; pass one of them as the "
                                                "split .--split; --train-split or --val-split"):
        build_dataset(DataSpec(f"folder:{tmp_path}", 32), "test")


def _tar(path, members):
    """A tar file of (name in the archive, file on disk)."""
    import tarfile

    with tarfile.open(path, "w") as tf:
        for name, file in members:
            tf.add(file, arcname=name)


def _tar_layouts(tmp_path):
    """The train and val images of ``image_folder`` in the tar layouts timm's reader takes."""
    image_folder(tmp_path / "folder")
    classes = {c: sorted((tmp_path / "folder" / "train" / c).iterdir()) for c in ("cat", "dog")}
    # ROOT/train.tar of class folders
    (tmp_path / "one").mkdir()
    _tar(tmp_path / "one" / "train.tar", [(f"{c}/{f.name}", f) for c, files in classes.items() for f in files])
    # ROOT/train/ of shards, one per class (the name of a shard is its class)
    (tmp_path / "shards" / "train").mkdir(parents=True)
    for c, files in classes.items():
        _tar(tmp_path / "shards" / "train" / f"{c}.tar", [(f.name, f) for f in files])
    # ROOT/train.tar of one tar per class (ImageNet's training tar)
    (tmp_path / "nested").mkdir()
    _tar(tmp_path / "nested" / "train.tar", [(f"{c}.tar", tmp_path / "shards" / "train" / f"{c}.tar") for c in classes])
    for layout in ("one", "shards", "nested"):
        shutil.copytree(tmp_path / "folder" / "val", tmp_path / layout / "val")
    return tmp_path / "folder", [tmp_path / layout for layout in ("one", "shards", "nested")]


def test_a_training_split_in_tar_files_reads_the_images_and_classes_of_the_folder(tmp_path):
    folder, layouts = _tar_layouts(tmp_path)
    spec = lambda root: DataSpec(f"folder:{root}", 32)  # noqa: E731
    plain = build_dataset(spec(folder), "train", train=False)  # the evaluation transform: deterministic

    def samples(ds):
        return sorted((int(y), x.sum().item(), x) for x, y in (ds[i] for i in range(len(ds))))

    expected = samples(plain)
    for root in layouts:
        ds = build_dataset(spec(root), "train", train=False)
        assert len(ds) == 8 and ds.num_classes == 2, root
        got = samples(ds)
        assert [(y, s) for y, s, _ in got] == [(y, s) for y, s, _ in expected], root
        assert all(torch.equal(a[2], b[2]) for a, b in zip(got, expected)), root


def test_a_folder_of_shards_trains_and_a_split_without_images_is_named(tmp_path):
    from lookhere.cli import main

    _, (_, shards, _) = _tar_layouts(tmp_path)
    run = tmp_path / "run"
    assert main(["train", "--data", f"folder:{shards}", "--pos-encoding", "lh-90", "--model", "micro", "--depth", "1",
                 "--img-size", "32", "--patch-size", "8", "--epochs", "1", "--batch-size", "4", "--workers", "2",
                 "--log-every", "1", "--output", str(run), "--no-progress"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [1, 2] and all(math.isfinite(r["loss"]) and r["skipped"] == 0 for r in steps)
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [0]  # validated on the val/ folder
    (tmp_path / "empty" / "test").mkdir(parents=True)
    _tar(tmp_path / "empty" / "test" / "notes.tar", [("readme.txt", (run / "config.yaml"))])
    with pytest.raises(FileNotFoundError, match="test holds no images in tar files"):
        build_dataset(DataSpec(f"folder:{tmp_path / 'empty'}", 32), "test")


def test_data_length_keeps_the_first_training_images_of_a_folder(tmp_path):
    """--data-length is the number of training samples for every kind of dataset; validation keeps all."""
    image_folder(tmp_path)
    spec = DataSpec(f"folder:{tmp_path}", 32, length=3)
    train, val = build_dataset(spec, "train"), build_dataset(spec, "val")
    assert len(train) == 3 and len(val) == 8 and train.num_classes == 2


def _wds_shards(folder, directory, per_shard=3):
    """The train images of ``folder`` as webdataset shards in ``directory``: KEY.png beside KEY.cls (the
    class index, cat 0 and dog 1), the classes interleaved, ``per_shard`` samples a shard."""
    import io
    import tarfile

    files = sorted((i, f) for c, i in (("cat", 0), ("dog", 1)) for f in (folder / "train" / c).iterdir())
    files = [files[k] for k in np.random.default_rng(0).permutation(len(files))]
    directory.mkdir(parents=True)
    for s in range(0, len(files), per_shard):
        with tarfile.open(directory / f"shard-{s // per_shard:06d}.tar", "w") as tf:
            for k, (label, f) in enumerate(files[s:s + per_shard], start=s):
                for name, data in ((f"{k:06d}.cls", str(label).encode()), (f"{k:06d}.png", f.read_bytes())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return sorted(directory.glob("*.tar"))


def test_webdataset_shards_read_the_images_and_classes_of_the_folder_with_random_access(tmp_path):
    from torch.utils.data import DataLoader

    folder, _ = _tar_layouts(tmp_path)
    shards = _wds_shards(folder, tmp_path / "wds" / "train")
    (tmp_path / "single").mkdir()
    shutil.copy(shards[0], tmp_path / "single" / "train.tar")
    spec = lambda root: DataSpec(f"folder:{root}", 32)  # noqa: E731

    def samples(ds):
        return sorted((int(y), x.sum().item()) for x, y in (ds[i] for i in range(len(ds))))

    expected = samples(build_dataset(spec(folder), "train", train=False))
    ds = build_dataset(spec(tmp_path / "wds"), "train", train=False)
    assert len(ds) == 8 and ds.num_classes == 2 and samples(ds) == expected
    single = build_dataset(spec(tmp_path / "single"), "train", train=False)  # one shard as ROOT/train.tar
    assert len(single) == 3 and set(samples(single)) <= set(expected)
    # Forked loader workers read the same samples as the process that opened the shards first.
    direct = [(x, int(y)) for x, y in (ds[i] for i in range(len(ds)))]
    loaded = [(x, int(y)) for x, y in DataLoader(ds, batch_size=None, num_workers=2)]
    assert all(torch.equal(a, b) and s == t for (a, s), (b, t) in zip(direct, loaded))


def test_webdataset_shards_train_and_a_bad_shard_is_one_message(tmp_path):
    import io
    import tarfile

    from lookhere.cli import main

    folder, _ = _tar_layouts(tmp_path)
    _wds_shards(folder, tmp_path / "wds" / "train")
    shutil.copytree(folder / "val", tmp_path / "wds" / "val")
    run = tmp_path / "run"
    assert main(["train", "--data", f"folder:{tmp_path / 'wds'}", "--model", "micro", "--depth", "1",
                 "--img-size", "32", "--patch-size", "8", "--epochs", "1", "--batch-size", "4", "--workers", "2",
                 "--output", str(run), "--no-progress"]) == 0
    assert [json.loads(line)["val_acc"] >= 0 for line in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] == "epoch"] == [True]

    def shard(directory, members):
        directory.mkdir(parents=True)
        with tarfile.open(directory / "shard-0.tar", "w") as tf:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))

    png = next((folder / "train" / "cat").iterdir()).read_bytes()
    shard(tmp_path / "nolabel" / "train", [("a.cls", b"0"), ("a.png", png), ("b.png", png)])
    with pytest.raises(ValueError, match=r"shard-0.tar: 1 image\(s\) without a cls label beside them \(first: b;"):
        build_dataset(DataSpec(f"folder:{tmp_path / 'nolabel'}", 32), "train")
    shard(tmp_path / "badlabel" / "train", [("a.cls", b"cat"), ("a.png", png)])
    with pytest.raises(ValueError, match=r"shard-0.tar: a.cls holds 'cat', not a class index"):
        build_dataset(DataSpec(f"folder:{tmp_path / 'badlabel'}", 32), "train")
    good = sorted((tmp_path / "wds" / "train").glob("*.tar"))
    (tmp_path / "cut" / "train").mkdir(parents=True)
    for f in good:
        shutil.copy(f, tmp_path / "cut" / "train" / f.name)
    last = tmp_path / "cut" / "train" / good[-1].name
    last.write_bytes(last.read_bytes()[:len(last.read_bytes()) // 2])  # cut short, as by an interrupted copy
    with pytest.raises(ValueError, match=rf"{good[-1].name}: not a readable tar file .*replace or remove this shard"):
        build_dataset(DataSpec(f"folder:{tmp_path / 'cut'}", 32), "train")
    (tmp_path / "notatar").mkdir()
    (tmp_path / "notatar" / "train.tar").write_bytes(png)
    with pytest.raises(FileNotFoundError, match=r"notatar/train.tar holds no images in tar files"):
        build_dataset(DataSpec(f"folder:{tmp_path / 'notatar'}", 32), "train")


def test_webdataset_shards_keep_only_a_few_files_open_and_read_every_sample(tmp_path, monkeypatch):
    """Random access over more shards than a process may open (1024 by default; imagenet-1k-wds has 1024)
    keeps at most MAX_OPEN_SHARDS open, the least recently used closed first, in every loader worker."""
    import os
    import tarfile

    from torch.utils.data import DataLoader

    from lookhere.data.wds_shards import WebDatasetShards

    image_folder(tmp_path / "folder")
    shards = _wds_shards(tmp_path / "folder", tmp_path / "wds", per_shard=1)
    assert len(shards) == 8
    expected = {}
    for s in shards:
        with tarfile.open(s) as tf:
            expected.update({m.name[:-4]: tf.extractfile(m).read() for m in tf if m.name.endswith(".png")})
    monkeypatch.setattr(WebDatasetShards, "MAX_OPEN_SHARDS", 3, raising=False)
    reader = WebDatasetShards(shards)
    folder = str((tmp_path / "wds").resolve())

    def open_shards():  # this process's open files on a shard
        if not os.path.isdir("/proc/self/fd"):
            return len(reader._files)
        links = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                links.append(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:  # the listing's own descriptor, closed by now
                pass
        return sum(link.startswith(folder) for link in links)

    def read(i):
        data, _ = reader[i]
        return reader._filename(i, basename=True), data.read()

    order = [int(i) for i in np.random.default_rng(0).permutation(np.tile(np.arange(len(reader)), 3))]
    for i in order:
        key, data = read(i)
        assert data == expected[key] and open_shards() <= 3, (i, open_shards())
    assert open_shards() == 3
    # Forked workers close the handles they inherit and open their own; the parent reads on unharmed.
    loaded = [(data.read(), int(y)) for data, y in DataLoader(reader, batch_size=None, num_workers=2)]
    assert [d for d, _ in loaded] == [read(i)[1] for i in range(len(reader))]
    assert [y for _, y in loaded] == list(reader.targets) and open_shards() == 3


def test_a_webdataset_shard_cut_between_members_or_compressed_is_refused(tmp_path):
    """A copy cut at a member boundary or inside a header reads as a shorter tar without any error (only
    the end-of-archive marker is missing); a gzipped shard named .tar has no offsets to read images by."""
    import gzip
    import tarfile

    from lookhere.data.wds_shards import WebDatasetShards

    image_folder(tmp_path / "folder")
    shard = _wds_shards(tmp_path / "folder", tmp_path / "wds", per_shard=3)[0]
    assert len(WebDatasetShards([shard])) == 3
    with tarfile.open(shard) as tf:
        headers = [m.offset for m in tf]  # where each member's header starts: cls, png, cls, png, ...
    full = shard.read_bytes()
    for n, cut in enumerate((headers[2], headers[2] + 100, headers[-2] + 511, headers[-1])):
        path = tmp_path / f"cut{n}" / shard.name
        path.parent.mkdir()
        path.write_bytes(full[:cut])
        with pytest.raises(ValueError, match=rf"{shard.name}: not a readable tar file \(cut short.*replace or remove"):
            WebDatasetShards([path])
    gz = tmp_path / "gz" / "train" / shard.name
    gz.parent.mkdir(parents=True)
    gz.write_bytes(gzip.compress(full))
    with pytest.raises(ValueError, match=rf"{shard.name}: not a readable tar file \(gzip-compressed.*gunzip"):
        WebDatasetShards([gz])
    with pytest.raises(FileNotFoundError, match=r"holds no images in tar files .*not a readable tar file \(gzip"):
        build_dataset(DataSpec(f"folder:{tmp_path / 'gz'}", 32), "train")
