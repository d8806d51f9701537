import json
import logging
import os
import pickle
import struct

import numpy as np
import pytest

from soco_d2.data.proposals import ProposalStore, ProposalWriter, merge_proposals, write_proposals


def _entries():
    return {
        "n01/b.jpg": (np.array([[10.4, 10.6, 50.5, 51.5], [-3.0, 0.0, 700.0, 20.0]]), (100, 640)),
        "n01/a.jpg": (np.zeros((0, 4)), (30, 40)),
        "n02/sub/c.png": (np.array([[0, 0, 65535, 65535]], np.float32), (65535, 65535)),
        "é/ü.jpg": (np.array([[1, 2, 3, 4]]), (10, 10)),
    }


def test_round_trip(tmp_path):
    path = tmp_path / "p.socoprop"
    write_proposals(path, _entries(), metadata={"mode": "fast"})
    store = ProposalStore.open(path)
    assert len(store) == 4 and store.num_boxes == 4
    assert store.keys == ["n01/a.jpg", "n01/b.jpg", "n02/sub/c.png", "é/ü.jpg"]
    boxes = store.get("n01/b.jpg")
    assert boxes.dtype == np.float32 and boxes.shape == (2, 4)
    # rint (half to even: 50.5 -> 50, 51.5 -> 52), then clipped to the image (W=640, H=100)
    np.testing.assert_array_equal(boxes, [[10, 11, 50, 52], [0, 0, 640, 20]])
    empty = store.get("n01/a.jpg")
    assert empty.shape == (0, 4) and empty.dtype == np.float32
    np.testing.assert_array_equal(store.get("n02/sub/c.png"), [[0, 0, 65535, 65535]])
    np.testing.assert_array_equal(store.get("é/ü.jpg"), [[1, 2, 3, 4]])
    assert store.get("n01/missing.jpg") is None and store.get("") is None and store.get("zzz") is None
    assert "n01/a.jpg" in store and "n01" not in store
    assert store.image_size("n01/b.jpg") == (100, 640)
    with pytest.raises(KeyError, match="missing.jpg"):
        store.image_size("missing.jpg")
    assert store.metadata == {"mode": "fast"}
    np.testing.assert_array_equal(store.box_counts(), [0, 2, 1, 1])


def test_eight_bytes_per_box_and_memory_mapped(tmp_path):
    rng = np.random.default_rng(0)
    entries = {f"img{i:04d}.jpg": (rng.integers(0, 500, (50, 4)), (500, 500)) for i in range(200)}
    path = tmp_path / "p.socoprop"
    write_proposals(path, entries)
    store = ProposalStore.open(path)
    assert store._boxes.dtype == np.uint16 and store._boxes.nbytes == 8 * 10000
    assert os.path.getsize(path) < 8 * 10000 + 60 * 200 + 1024  # boxes + small per-image index
    assert isinstance(store._mmap, np.memmap) and np.shares_memory(store._boxes, store._mmap)
    np.testing.assert_array_equal(store.get("img0007.jpg"), entries["img0007.jpg"][0])

    blob = pickle.dumps(store)
    assert len(blob) < 500  # the path only, never the arrays
    again = pickle.loads(blob)
    np.testing.assert_array_equal(again.get("img0199.jpg"), entries["img0199.jpg"][0])
    assert np.shares_memory(again._boxes, again._mmap)


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="big.jpg.*65535"):
        write_proposals(tmp_path / "x", {"big.jpg": (np.zeros((1, 4)), (70000, 10))})
    with pytest.raises(ValueError, match="nan.jpg.*NaN"):
        write_proposals(tmp_path / "x", {"nan.jpg": (np.array([[0, 0, np.nan, 1]]), (10, 10))})

    junk = tmp_path / "junk.socoprop"
    junk.write_bytes(b'{"not": "proposals"}')
    with pytest.raises(ValueError, match="junk.socoprop.*SOCOPROP signature"):
        ProposalStore.open(junk)
    with pytest.raises(FileNotFoundError, match="nothere"):
        ProposalStore.open(tmp_path / "nothere.socoprop")

    good = tmp_path / "good.socoprop"
    write_proposals(good, _entries())
    data = good.read_bytes()
    (tmp_path / "cut.socoprop").write_bytes(data[:-10])
    with pytest.raises(ValueError, match="cut.socoprop.*truncated"):
        ProposalStore.open(tmp_path / "cut.socoprop")
    (tmp_path / "head.socoprop").write_bytes(data[:40])
    with pytest.raises(ValueError, match="head.socoprop.*header"):
        ProposalStore.open(tmp_path / "head.socoprop")


def _shard_files(tmp_path, entries, n):
    keys = sorted(entries)
    paths = []
    for i in range(n):
        p = tmp_path / f"shard{i}.socoprop"
        write_proposals(p, {k: entries[k] for k in keys[i::n]}, metadata={"mode": "fast"})
        paths.append(str(p))
    return paths


@pytest.mark.parametrize("block_images", [1, 3, 1 << 16])
def test_merge_equals_single_file(tmp_path, block_images):
    rng = np.random.default_rng(1)
    entries = {f"d{i % 3}/im{i:03d}.jpg": (rng.integers(0, 90, (i % 5, 4)), (90, 100 + i)) for i in range(23)}
    paths = _shard_files(tmp_path, entries, 3)
    paths.append(paths[1])  # an exact duplicate input is harmless
    merge_proposals(paths, tmp_path / "merged.socoprop", block_images=block_images)
    write_proposals(tmp_path / "single.socoprop", entries, metadata={"mode": "fast"})
    merged = (tmp_path / "merged.socoprop").read_bytes()
    assert merged == (tmp_path / "single.socoprop").read_bytes()
    store = ProposalStore.open(tmp_path / "merged.socoprop")
    for k, (boxes, hw) in entries.items():
        np.testing.assert_array_equal(store.get(k), boxes)
        assert store.image_size(k) == hw


def test_merge_conflict(tmp_path):
    write_proposals(tmp_path / "a.socoprop", {"x.jpg": (np.array([[0, 0, 5, 5]]), (10, 10))})
    write_proposals(tmp_path / "b.socoprop", {"x.jpg": (np.array([[0, 0, 6, 6]]), (10, 10))})
    with pytest.raises(ValueError, match=r"'x.jpg'.*a.socoprop.*b.socoprop"):
        merge_proposals([tmp_path / "a.socoprop", tmp_path / "b.socoprop"], tmp_path / "m.socoprop")
    with pytest.raises(ValueError, match="at least one"):
        merge_proposals([], tmp_path / "m.socoprop")


def test_writer_chunks_kill_and_resume(tmp_path):
    out = tmp_path / "out.socoprop"
    boxes = {f"k{i}.jpg": (np.array([[i, 0, i + 40, 40]]), (50, 100)) for i in range(8)}
    writer = ProposalWriter(out, chunk_size=3, metadata={"mode": "fast"})
    for i in range(7):
        writer.add(f"k{i}.jpg", *boxes[f"k{i}.jpg"])
    (tmp_path / "out.socoprop.parts" / ".chunk-000009.socoprop.x1y2z3.tmp").write_bytes(b"half")
    del writer  # killed: the 7th image was still buffered and is lost

    with pytest.raises(FileExistsError, match="--resume"):
        ProposalWriter(out, chunk_size=3)
    with pytest.raises(ValueError, match="cannot resume"):
        ProposalWriter(out, resume=True, metadata={"mode": "quality"})
    writer = ProposalWriter(out, chunk_size=3, resume=True, metadata={"mode": "fast"})
    assert writer.done_keys == {f"k{i}.jpg" for i in range(6)}
    assert not any(n.endswith(".tmp") for n in os.listdir(tmp_path / "out.socoprop.parts"))
    for i in range(6, 8):
        writer.add(f"k{i}.jpg", *boxes[f"k{i}.jpg"])
    writer.close()
    assert not (tmp_path / "out.socoprop.parts").exists()
    store = ProposalStore.open(out)
    assert store.keys == sorted(boxes) and store.metadata == {"mode": "fast"}
    for k, (b, _) in boxes.items():
        np.testing.assert_array_equal(store.get(k), b)

    # resuming a finished file adds new images to it
    with ProposalWriter(out, chunk_size=3, resume=True, metadata={"mode": "fast"}) as writer:
        assert len(writer.done_keys) == 8
        writer.add("new.jpg", np.zeros((0, 4)), (5, 5))
    assert len(ProposalStore.open(out)) == 9


def test_writer_flushes_on_exception(tmp_path):
    out = tmp_path / "out.socoprop"
    with pytest.raises(RuntimeError):
        with ProposalWriter(out, chunk_size=100) as writer:
            writer.add("a.jpg", np.array([[0, 0, 4, 4]]), (8, 8))
            raise RuntimeError("stop")
    assert not out.exists()
    assert ProposalWriter(out, resume=True).done_keys == {"a.jpg"}


def test_empty_writer_gives_empty_file(tmp_path):
    with ProposalWriter(tmp_path / "e.socoprop"):
        pass
    store = ProposalStore.open(tmp_path / "e.socoprop")
    assert len(store) == 0 and store.keys == [] and store.get("a") is None


def test_unreadable_images_are_recorded_merged_and_resumed(tmp_path):
    boxes = np.array([[1, 2, 10, 12]], np.float32)
    a, b = tmp_path / "a.socoprop", tmp_path / "b.socoprop"
    write_proposals(a, {"x.jpg": (boxes, (20, 20))}, unreadable={"bad.png": "the file is empty"})
    # b read "bad.png" (fixed since) and found "worse.jpg" unreadable.
    write_proposals(b, {"bad.png": (boxes, (20, 20))}, unreadable={"worse.jpg": "corrupt"})
    store = ProposalStore.open(a)
    assert store.keys == ["x.jpg"] and store.unreadable == {"bad.png": "the file is empty"}
    assert "bad.png" not in store and store.unreadable_keys == ["bad.png"]
    merge_proposals([a, b], tmp_path / "m.socoprop")
    merged = ProposalStore.open(tmp_path / "m.socoprop")
    assert merged.keys == ["bad.png", "x.jpg"] and merged.unreadable == {"worse.jpg": "corrupt"}
    with pytest.raises(ValueError, match="also listed as unreadable"):
        write_proposals(tmp_path / "c", {"x.jpg": (boxes, (20, 20))}, unreadable={"x.jpg": "?"})

    out = tmp_path / "w.socoprop"
    writer = ProposalWriter(out, chunk_size=2)
    writer.add("k1.jpg", boxes, (20, 20))
    writer.add_unreadable("k2.jpg", "truncated")  # second entry: a chunk is written
    writer.add_unreadable("k3.jpg", "bomb")
    del writer  # killed: k3 was only buffered
    writer = ProposalWriter(out, chunk_size=2, resume=True)
    assert writer.done_keys == {"k1.jpg", "k2.jpg"}  # unreadable images are not retried
    writer.add_unreadable("k3.jpg", "bomb")
    writer.close()
    final = ProposalStore.open(out)
    assert final.keys == ["k1.jpg"] and final.unreadable == {"k2.jpg": "truncated", "k3.jpg": "bomb"}


def _offsets(path):
    """(data start, header) of a proposals file."""
    raw = open(path, "rb").read()
    length = struct.unpack("<8sII", raw[:16])[2]
    header = json.loads(raw[20:20 + length])
    return (20 + length + 63) // 64 * 64, header


def _flip(path, position):
    with open(path, "r+b") as f:
        f.seek(position)
        byte = f.read(1)
        f.seek(position)
        f.write(bytes([byte[0] ^ 0x10]))


@pytest.mark.parametrize("where", ["header", "box_offsets", "image_hw", "key_blob"])
def test_a_flipped_bit_in_the_header_or_index_is_found_on_open(tmp_path, where):
    path = tmp_path / "p.socoprop"
    write_proposals(path, _entries())
    start, header = _offsets(path)
    if where == "header":  # inside the array offsets of the JSON header
        raw = open(path, "rb").read()
        position = raw.index(b'"offset"', 20) + len(b'"offset": ')
    else:
        position = start + header["arrays"][where]["offset"] + 1
    _flip(path, position)
    with pytest.raises(ValueError, match=r"p\.socoprop.*(checksum).*regenerate it with "
                                         r"tools/generate_proposals\.py"):
        ProposalStore.open(path)


def test_a_flipped_bit_in_the_boxes_is_found_when_they_are_read(tmp_path):
    entries = _entries()
    path = tmp_path / "p.socoprop"
    write_proposals(path, entries)
    start, header = _offsets(path)
    first = next(k for k in sorted(entries, key=str.encode) if len(entries[k][0]))
    _flip(path, start + header["arrays"]["boxes"]["offset"] + 2)  # a box of the first image
    store = ProposalStore.open(path)  # the index is intact
    with pytest.raises(ValueError, match=f"boxes of image {first!r} do not match their checksum"):
        store.get(first)
    for key in set(entries) - {first}:
        store.get(key)  # the other images are fine
    with pytest.raises(ValueError, match="cannot merge.*do not match their checksum"):
        merge_proposals([str(path)], str(tmp_path / "merged.socoprop"))


def _as_version_1(v2, v1):
    """The file a version-1 writer made of the same entries (no checksums)."""
    start, header = _offsets(v2)
    raw = open(v2, "rb").read()
    data = raw[start:start + header["arrays"]["box_crc"]["offset"]]
    del header["arrays"]["box_crc"], header["index_crc32"]
    header["file_size"] = 10**19
    data_start = (16 + len(json.dumps(header, sort_keys=True)) + 63) // 64 * 64
    header["file_size"] = data_start + len(data)
    body = json.dumps(header, sort_keys=True).encode()
    body += b" " * (data_start - 16 - len(body))
    with open(v1, "wb") as f:
        f.write(struct.pack("<8sII", b"SOCOPROP", 1, len(body)) + body + data)


def test_version_1_files_without_checksums_are_still_read_with_a_warning(tmp_path, caplog):
    entries = _entries()
    write_proposals(tmp_path / "v2.socoprop", entries)
    _as_version_1(tmp_path / "v2.socoprop", tmp_path / "v1.socoprop")
    with caplog.at_level(logging.WARNING):
        store = ProposalStore.open(tmp_path / "v1.socoprop")
    assert store.version == 1 and "without checksums" in caplog.text and "--merge" in caplog.text
    v2 = ProposalStore.open(tmp_path / "v2.socoprop")
    for key in entries:
        np.testing.assert_array_equal(store.get(key), v2.get(key))
        assert store.image_size(key) == v2.image_size(key)
    merge_proposals([str(tmp_path / "v1.socoprop")], str(tmp_path / "again.socoprop"))
    assert (tmp_path / "again.socoprop").read_bytes() == (tmp_path / "v2.socoprop").read_bytes()
