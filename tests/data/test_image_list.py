import json
import logging
import os
import pickle
import sys

import cv2
import numpy as np
import pytest
from PIL import Image

from soco_d2.data.image_list import (
    ImageList,
    UnreadableImageError,
    default_coco_image_root,
    list_images,
    read_image,
    resolve_image_source,
)


def _rgb(h=24, w=32, seed=0):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------
# read_image
# ------------------------------------------------------------------------------------------------


def test_read_png_rgb_exact(tmp_path):
    a = _rgb()
    Image.fromarray(a).save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.shape == (24, 32, 3)
    np.testing.assert_array_equal(out, a)  # RGB order, not BGR


def test_read_grayscale_and_palette(tmp_path):
    g = _rgb()[:, :, 0]
    Image.fromarray(g).save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    assert out.shape == (24, 32, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], g)

    pal = Image.fromarray(_rgb()).convert("P", palette=Image.ADAPTIVE, colors=16)
    pal.save(tmp_path / "p.png")
    expected = np.asarray(pal.convert("RGB"))
    np.testing.assert_array_equal(read_image(tmp_path / "p.png"), expected)


def test_read_16bit_scaled(tmp_path):
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "g16.png"), values)
    out = read_image(tmp_path / "g16.png")
    # round(x * 255 / 65535): 0 -> 0, 257 -> 1, 32768 -> 128 (127.5019...), 65535 -> 255
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 128, 255])
    bgr16 = np.zeros((2, 2, 3), np.uint16)
    bgr16[..., 2] = 65535  # red in OpenCV's BGR order
    cv2.imwrite(str(tmp_path / "c16.png"), bgr16)
    out = read_image(tmp_path / "c16.png")
    np.testing.assert_array_equal(out[0, 0], [255, 0, 0])


def test_read_alpha_dropped(tmp_path):
    a = _rgb()
    rgba = np.dstack([a, np.full(a.shape[:2], 7, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), a)
    la = Image.fromarray(a[:, :, 0]).convert("LA")
    la.save(tmp_path / "la.png")
    out = read_image(tmp_path / "la.png")
    np.testing.assert_array_equal(out[:, :, 1], a[:, :, 0])


def test_read_cmyk_jpeg_matches_pillow(tmp_path):
    Image.fromarray(_rgb(64, 80)).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    out = read_image(tmp_path / "c.jpg")
    ref = np.asarray(Image.open(tmp_path / "c.jpg").convert("RGB")).astype(int)
    assert out.shape == (64, 80, 3)
    assert np.abs(out.astype(int) - ref).mean() < 3


def test_read_cmyk_tiff_pillow_fallback(tmp_path):
    a = _rgb()
    Image.fromarray(a).convert("CMYK").save(tmp_path / "c.tif")
    out = read_image(tmp_path / "c.tif")
    ref = np.asarray(Image.open(tmp_path / "c.tif").convert("RGB"))
    np.testing.assert_array_equal(out, ref)


def test_exif_orientation_not_applied(tmp_path):
    a = _rgb(20, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(a).save(tmp_path / "o.jpg", exif=exif, quality=100)
    out = read_image(tmp_path / "o.jpg")
    assert out.shape == (20, 40, 3)  # stored grid, not the rotated 40x20


@pytest.mark.parametrize("ext, cut", [("jpg", 2), ("jpg", 100), ("jpg", 0.5), ("png", 100), ("png", 0.5)])
def test_truncated_files_raise(tmp_path, ext, cut):
    Image.fromarray(_rgb(64, 64)).save(tmp_path / f"full.{ext}")
    data = (tmp_path / f"full.{ext}").read_bytes()
    n = int(len(data) * cut) if isinstance(cut, float) else len(data) - cut
    (tmp_path / f"t.{ext}").write_bytes(data[:n])
    with pytest.raises(UnreadableImageError) as info:
        read_image(tmp_path / f"t.{ext}")
    assert info.value.path.endswith(f"t.{ext}") and f"t.{ext}" in str(info.value)


def test_png_missing_only_its_end_chunk_is_complete(tmp_path):
    a = _rgb()
    Image.fromarray(a).save(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[:-2])  # pixel data intact, IEND CRC cut
    np.testing.assert_array_equal(read_image(tmp_path / "t.png"), a)


def test_corrupt_missing_empty_raise(tmp_path):
    (tmp_path / "junk.jpg").write_bytes(b"this is not an image at all" * 10)
    (tmp_path / "empty.png").write_bytes(b"")
    for name, reason in [("junk.jpg", "corrupt"), ("empty.png", "empty"), ("nope.jpg", "No such")]:
        with pytest.raises(UnreadableImageError) as info:
            read_image(tmp_path / name)
        assert reason in info.value.reason
        assert name in str(info.value)
    err = pickle.loads(pickle.dumps(UnreadableImageError("x.jpg", "bad")))
    assert (err.path, err.reason) == ("x.jpg", "bad")


# ------------------------------------------------------------------------------------------------
# list_images
# ------------------------------------------------------------------------------------------------


def _touch_images(root, names):
    for n in names:
        p = root / n
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")


def test_folder_tree(tmp_path):
    _touch_images(
        tmp_path,
        ["n02/b.JPEG", "n01/a.jpg", "n01/c.PNG", "n01/notes.txt", "n01/.hidden.jpg",
         ".cache/x.jpg", "top.webp", "deep/er/d.tiff"],
    )
    images = list_images(tmp_path)
    assert images.keys == ["deep/er/d.tiff", "n01/a.jpg", "n01/c.PNG", "n02/b.JPEG", "top.webp"]
    assert images.root == str(tmp_path)
    assert images.path(1) == os.path.join(str(tmp_path), "n01", "a.jpg")
    assert images.index_of("n02/b.JPEG") == 3
    assert "top.webp" in images and "n01/notes.txt" not in images
    with pytest.raises(KeyError, match="missing.jpg"):
        images.index_of("missing.jpg")
    again = pickle.loads(pickle.dumps(images))
    assert again.keys == images.keys and again.index_of("top.webp") == 4


def test_empty_and_missing_sources(tmp_path):
    _touch_images(tmp_path, ["a.txt", "b.gif"])
    with pytest.raises(ValueError, match=r"no images found.*\.jpg"):
        list_images(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_images(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="neither a folder"):
        list_images(tmp_path / "b.gif")


def test_list_file(tmp_path):
    _touch_images(tmp_path, ["data/train/n1/a.jpg", "data/train/n2/b.jpg", "data/c d.png"])
    lst = tmp_path / "data" / "train_map.txt"
    lst.write_text(
        "# comment\n\ntrain/n1/a.jpg\t0\ntrain/n2/b.jpg 1\n"
        f"{tmp_path}/data/c d.png\n"
    )
    images = list_images(lst)
    assert images.root == str(tmp_path / "data")
    assert images.keys == ["c d.png", "train/n1/a.jpg", "train/n2/b.jpg"]

    lst.write_text("train/n1/a.jpg\ntrain/missing1.jpg 3\ntrain/missing2.jpg\n")
    with pytest.raises(FileNotFoundError, match=r"2 of the 3 images.*missing1"):
        list_images(lst)


def test_list_file_outside_its_folder(tmp_path):
    _touch_images(tmp_path, ["imgs/x/a.jpg", "imgs/y/b.jpg"])
    (tmp_path / "lists").mkdir()
    lst = tmp_path / "lists" / "l.txt"
    lst.write_text(f"{tmp_path}/imgs/x/a.jpg\n../imgs/y/b.jpg\n")
    images = list_images(lst)
    assert images.root == str(tmp_path / "imgs")
    assert images.keys == ["x/a.jpg", "y/b.jpg"]


def test_coco_json(tmp_path):
    _touch_images(tmp_path, ["train2017/1.jpg", "train2017/2.jpg"])
    (tmp_path / "annotations").mkdir()
    ann = tmp_path / "annotations" / "instances_train2017.json"
    ann.write_text(json.dumps({"images": [{"id": 2, "file_name": "2.jpg"}, {"id": 1, "file_name": "1.jpg"}]}))
    assert default_coco_image_root(str(ann)) == str(tmp_path / "train2017")
    images = list_images(ann)
    assert images.root == str(tmp_path / "train2017") and images.keys == ["1.jpg", "2.jpg"]

    # explicit root, sub-folders in file_name
    other = tmp_path / "elsewhere.json"
    other.write_text(json.dumps({"images": [{"file_name": "train2017/1.jpg"}]}))
    assert default_coco_image_root(str(other)) == str(tmp_path)
    assert list_images(other).keys == ["train2017/1.jpg"]
    assert list_images(ann, image_root=tmp_path / "train2017").keys == ["1.jpg", "2.jpg"]

    # Penn-Fudan's layout: the images in a sibling folder that is not named after the split
    pf = tmp_path / "pennfudan"
    _touch_images(pf, ["PNGImages/FudanPed00002.png", "PedMasks/FudanPed00002_mask.png"])
    (pf / "annotations").mkdir()
    pf_json = pf / "annotations" / "instances_train.json"
    pf_json.write_text(json.dumps({"images": [{"id": 2, "file_name": "FudanPed00002.png"}]}))
    assert default_coco_image_root(str(pf_json)) == str(pf / "PNGImages")
    assert list_images(pf_json).keys == ["FudanPed00002.png"]

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match="no 'images' list"):
        list_images(bad)
    with pytest.raises(FileNotFoundError, match="2 of the 2 images"):
        list_images(ann, image_root=tmp_path)


def test_coco_mini_real(data_root):
    ann = os.path.join(data_root, "coco_mini", "annotations", "instances_val2017.json")
    images = list_images(ann)
    assert images.root == os.path.join(data_root, "coco_mini", "val2017")
    assert len(images) == 79
    image = read_image(images.path(0))
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8


def test_builtin_names(tmp_path, monkeypatch):
    _touch_images(tmp_path, ["imagenet/train/n01/a.JPEG"])
    monkeypatch.setenv("SOCO_DATASETS", str(tmp_path))
    assert resolve_image_source("imagenet_train") == os.path.join(str(tmp_path), "imagenet/train")
    assert resolve_image_source("some/folder") == "some/folder"
    images = list_images("imagenet_train")
    assert images.keys == ["n01/a.JPEG"] and images.root == str(tmp_path / "imagenet" / "train")
    with pytest.raises(FileNotFoundError, match="'coco_2017_unlabeled'.*SOCO_DATASETS"):
        list_images("coco_2017_unlabeled")
    with pytest.raises(FileNotFoundError, match="builtin names: caltech101_subset"):
        list_images(tmp_path / "nowhere")


def test_image_list_dedups_and_sorts():
    images = ImageList("/r", ["b.jpg", "a.jpg", "b.jpg"])
    assert images.keys == ["a.jpg", "b.jpg"] and len(images) == 2


def test_read_image_reduced_decodes_jpeg_at_a_fraction(tmp_path):
    from PIL import Image

    from soco_d2.data.image_list import read_image_reduced

    rgb = np.zeros((480, 640, 3), np.uint8)
    rgb[100:300, 200:500] = (200, 30, 30)
    Image.fromarray(rgb).save(tmp_path / "a.jpg", quality=95)
    small, hw = read_image_reduced(tmp_path / "a.jpg", 128)
    assert hw == (480, 640) and small.shape == (120, 160, 3)  # 1/4: the smallest with side >= 128
    assert abs(int(small[50, 87, 0]) - 200) < 12 and small[5, 5].max() < 12  # same content, RGB
    full, hw = read_image_reduced(tmp_path / "a.jpg", 0)
    assert full.shape == (480, 640, 3) and hw == (480, 640)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.jpg")
    cmyk, hw = read_image_reduced(tmp_path / "c.jpg", 128)  # not RGB: read in full
    assert cmyk.shape == (480, 640, 3) and hw == (480, 640)
    (tmp_path / "t.jpg").write_bytes((tmp_path / "a.jpg").read_bytes()[:200])
    with pytest.raises(UnreadableImageError):
        read_image_reduced(tmp_path / "t.jpg", 128)


# ------------------------------------------------------------------------------------------------
# Hostile files: one contract for every decoder failure
# ------------------------------------------------------------------------------------------------

sys.path.insert(0, os.path.dirname(__file__))
from hostile_images import bomb_png, make_hostile_folder  # noqa: E402

from soco_d2.data.image_list import DEFAULT_MAX_IMAGE_PIXELS, read_image_reduced  # noqa: E402


def test_bomb_header_png_is_refused_before_decoding(tmp_path):
    data = bomb_png()
    assert len(data) < 70
    (tmp_path / "bomb.png").write_bytes(data)
    for read in (read_image, lambda p: read_image_reduced(p, 256)[0]):
        with pytest.raises(UnreadableImageError) as info:
            read(tmp_path / "bomb.png")
        assert "bomb.png" in str(info.value) and "pixels" in info.value.reason


def test_pixel_limit_is_checked_from_the_header_and_named(tmp_path):
    # 20000 x 15000 declared; a limit below it refuses the file and names the limit.
    (tmp_path / "big.png").write_bytes(bomb_png(20000, 15000))
    with pytest.raises(UnreadableImageError) as info:
        read_image(tmp_path / "big.png", max_pixels=10**8)
    assert "300000000 pixels" in info.value.reason and "limit of 100000000" in info.value.reason
    assert "MAX_IMAGE_PIXELS" in info.value.reason
    assert DEFAULT_MAX_IMAGE_PIXELS < 20000 * 15000  # refused by default too
    with pytest.raises(UnreadableImageError, match="limit"):
        read_image(tmp_path / "big.png")
    # A real image above a low limit is refused; under it, decoded.
    Image.fromarray(_rgb(40, 50)).save(tmp_path / "a.jpg")
    with pytest.raises(UnreadableImageError, match="40 = 2000 pixels"):
        read_image(tmp_path / "a.jpg", max_pixels=1999)
    with pytest.raises(UnreadableImageError, match="limit of 1999"):
        read_image_reduced(tmp_path / "a.jpg", 16, max_pixels=1999)
    assert read_image(tmp_path / "a.jpg", max_pixels=2000).shape == (40, 50, 3)


def test_any_decoder_exception_becomes_unreadable(tmp_path, monkeypatch):
    import soco_d2.data.image_list as image_list

    Image.fromarray(_rgb()).save(tmp_path / "a.png")

    def explode(*args, **kwargs):
        raise cv2.error("OpenCV(5.0.0) simulated decoder failure")

    monkeypatch.setattr(image_list.cv2, "imdecode", explode)
    # OpenCV raising is not the end: Pillow decodes the file.
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), _rgb())

    def no_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(image_list, "_decode_pil", no_memory)
    with pytest.raises(UnreadableImageError, match="out of memory"):
        read_image(tmp_path / "a.png")


def test_hostile_folder_reads_good_files_and_reports_bad_ones(tmp_path):
    good, bad = make_hostile_folder(tmp_path)
    for name in good:
        image = read_image(tmp_path / name)
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, name
        assert read_image_reduced(tmp_path / name, 32)[0].shape[2] == 3
    assert read_image(tmp_path / "one_pixel.png").shape == (1, 1, 3)
    assert read_image(tmp_path / "exif_rotated.jpg").shape == (32, 64, 3)  # stored grid
    for name in bad:
        for read in (read_image, lambda p: read_image_reduced(p, 32)):
            with pytest.raises(UnreadableImageError) as info:
                read(tmp_path / name)
            assert info.value.path.endswith(name) and info.value.reason


def test_pillow_bomb_warning_silenced_where_our_pixel_limit_decides(tmp_path, monkeypatch):
    import warnings

    from PIL import Image

    # Pillow warns above MAX_IMAGE_PIXELS (89M by default); lowered so that a small file is "large".
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    rgb = np.full((40, 40, 3), 120, np.uint8)  # 1600 pixels: above Pillow's warning threshold
    Image.fromarray(rgb).save(tmp_path / "big.png")
    Image.fromarray(rgb).save(tmp_path / "big.jpg")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "big.tif")  # Pillow decodes this one
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for name in ("big.png", "big.tif"):
            assert read_image(tmp_path / name).shape == (40, 40, 3)
        assert read_image_reduced(tmp_path / "big.jpg", 10)[1] == (40, 40)
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_image(tmp_path / "big.tif").shape == (40, 40, 3)
    # Without a limit of ours (0), Pillow's own warning is left as it is.
    with pytest.warns(Image.DecompressionBombWarning):
        read_image(tmp_path / "big.tif", max_pixels=0)


def test_a_named_pipe_is_refused_without_waiting_for_a_writer(tmp_path):
    """Opening a FIFO for reading blocks until a writer comes: reads refuse it at once, and a
    list file naming one is an error before anything is read."""
    import threading

    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    outcome = []

    def read():
        try:
            read_image(fifo)
        except UnreadableImageError as e:
            outcome.append(str(e))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(30)
    assert not reader.is_alive(), "read_image waited on a named pipe"
    assert outcome and "named pipe (FIFO)" in outcome[0] and "pipe.jpg" in outcome[0]

    _touch_images(tmp_path, ["a.jpg"])
    lst = tmp_path / "list.txt"
    lst.write_text("a.jpg\npipe.jpg\n")
    with pytest.raises(ValueError, match=r"1 of the 2 images.*pipe\.jpg.*named pipe"):
        list_images(lst)


def test_folder_listing_resolves_links_and_lists_each_real_file_once(tmp_path, caplog):
    _touch_images(tmp_path, ["d/a.jpg", "d/b.png", "e/c.jpg"])
    os.symlink(tmp_path / "d", tmp_path / "e" / "to_d")  # the same folder twice
    os.symlink(tmp_path, tmp_path / "d" / "up")  # a loop
    os.link(tmp_path / "d" / "a.jpg", tmp_path / "e" / "hard.jpg")  # one file, two names
    os.symlink(tmp_path / "e" / "c.jpg", tmp_path / "link.jpg")  # a link to a file
    with caplog.at_level(logging.INFO):
        images = list_images(tmp_path)
    assert images.keys == ["d/a.jpg", "d/b.png", "e/c.jpg"]
    assert "4 entries skipped" in caplog.text
    assert "2 file(s) listed already under another name" in caplog.text
    assert "2 folder(s) reached again through a link" in caplog.text
