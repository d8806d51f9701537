"""The proposals file: per-image boxes, compact and memory-mapped.

One file holds every image's boxes as uint16 ``x1, y1, x2, y2`` in original-image pixels (8 bytes
per box), indexed by image key (the path relative to the image root, :mod:`soco_d2.data.image_list`)
with sorted keys that lookups binary-search in place. The file is opened with one read-only
``mmap``, so DataLoader workers share the page cache (pickling reopens by path). Checksums of the
header, the index and each image's boxes turn flipped bits into an error naming the file and
the image; the header's ``unreadable`` entry lists the images the generator could not read
(:attr:`ProposalStore.unreadable`). The arrays, the layout and format versions:
docs/ARCHITECTURE.md, "The proposals file".
"""
from __future__ import annotations

import bisect
import json
import logging
import os
import struct
import zlib
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

import numpy as np

from soco_d2.utils.fileio import atomic_write

logger = logging.getLogger(__name__)

__all__ = ["ProposalStore", "ProposalWriter", "merge_proposals", "write_proposals", "FORMAT_VERSION"]

MAGIC = b"SOCOPROP"
FORMAT_VERSION = 2
_PREFIX = struct.Struct("<8sII")  # magic, version, header length
_HEADER_CRC = struct.Struct("<I")  # version 2: follows the prefix
_ALIGN = 64
_ARRAYS = (  # name, dtype, trailing shape
    ("key_offsets", np.int64, ()),
    ("key_blob", np.uint8, ()),
    ("image_hw", np.uint32, (2,)),
    ("box_offsets", np.int64, ()),
    ("boxes", np.uint16, (4,)),
    ("box_crc", np.uint32, ()),
)
_INDEX = ("key_offsets", "key_blob", "image_hw", "box_offsets", "box_crc")  # checked on open
_REGENERATE = ("regenerate it with tools/generate_proposals.py (or copy it again from a good "
               "source)")
_warned_unverified = set()
MAX_COORD = 65535


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------


def to_uint16_boxes(boxes, image_hw: Tuple[int, int], key: str = "?") -> np.ndarray:
    """Round float boxes (x1, y1, x2, y2) to whole pixels, clipped to the image, as uint16."""
    h, w = int(image_hw[0]), int(image_hw[1])
    if h > MAX_COORD or w > MAX_COORD or h < 1 or w < 1:
        raise ValueError(
            f"image {key!r} has size {h}x{w}; the proposals file stores 1..{MAX_COORD} pixels per side"
        )
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) if len(boxes) else np.zeros((0, 4))
    if not np.isfinite(boxes).all():
        raise ValueError(f"image {key!r}: proposals contain NaN or infinite coordinates")
    return np.clip(np.rint(boxes), 0, [w, h, w, h]).astype(np.uint16)


def _write_file(
    path: str,
    keys: Sequence[bytes],
    image_hw: np.ndarray,
    counts: np.ndarray,
    box_blocks: Iterable[np.ndarray],
    metadata: Optional[dict],
    unreadable: Optional[Dict[str, str]] = None,
    expected_crc: Optional[np.ndarray] = None,
) -> None:
    """Write a proposals file atomically; ``keys`` sorted; ``box_blocks`` yields uint16 (k, 4) in
    order (any number of images per block). ``expected_crc`` (optional, per image, -1 for
    unknown): the checksums the boxes had in the files they come from; a mismatch raises."""
    n = len(keys)
    key_offsets = np.zeros(n + 1, np.int64)
    np.cumsum([len(k) for k in keys], out=key_offsets[1:])
    box_offsets = np.zeros(n + 1, np.int64)
    np.cumsum(counts, out=box_offsets[1:])
    lengths = {
        "key_offsets": n + 1,
        "key_blob": int(key_offsets[-1]),
        "image_hw": n,
        "box_offsets": n + 1,
        "boxes": int(box_offsets[-1]),
        "box_crc": n,
    }
    arrays, pos = {}, 0
    for name, dtype, tail in _ARRAYS:
        shape = [lengths[name], *tail]
        arrays[name] = {"offset": pos, "shape": shape}
        pos = _align(pos + int(np.prod(shape)) * np.dtype(dtype).itemsize)
    header = {
        "num_images": n,
        "num_boxes": lengths["boxes"],
        "box_format": "x1y1x2y2 uint16, original-image pixels",
        "arrays": arrays,
        "metadata": metadata or {},
        "unreadable": dict(sorted((unreadable or {}).items())),
    }
    # Reserve room for the largest possible "file_size" and checksum, then pad the real header.
    header["file_size"], header["index_crc32"] = 10**19, 2**32 - 1
    prefix_size = _PREFIX.size + _HEADER_CRC.size
    data_start = _align(prefix_size + len(json.dumps(header, sort_keys=True).encode("utf-8")))
    header["file_size"] = data_start + pos
    index = {"key_offsets": key_offsets, "key_blob": np.frombuffer(b"".join(keys), np.uint8),
             "image_hw": np.ascontiguousarray(image_hw, np.uint32).reshape(n, 2),
             "box_offsets": box_offsets, "box_crc": np.zeros(n, np.uint32)}

    def write(f) -> None:
        def put(name: str, array: np.ndarray) -> None:
            f.seek(data_start + arrays[name]["offset"])
            f.write(np.ascontiguousarray(array).tobytes())

        f.seek(data_start + arrays["boxes"]["offset"])
        written, image, crc, left = 0, 0, 0, int(counts[0]) if n else 0
        for block in box_blocks:
            block = np.ascontiguousarray(block, dtype=np.uint16).reshape(-1, 4)
            f.write(block.tobytes())
            written += len(block)
            row = 0
            while image < n:  # per-image checksums, as the boxes stream by
                take = min(left, len(block) - row)
                crc = zlib.crc32(block[row:row + take].tobytes(), crc)
                row, left = row + take, left - take
                if left:
                    break
                index["box_crc"][image] = crc
                if expected_crc is not None and 0 <= expected_crc[image] != crc:
                    raise ValueError(f"the boxes of image {keys[image].decode('utf-8')!r} do not "
                                     "match their checksum in the file they come from")
                image, crc = image + 1, 0
                left = int(counts[image]) if image < n else 0
        if written != lengths["boxes"]:
            raise RuntimeError(f"wrote {written} boxes, expected {lengths['boxes']}")
        crc = 0
        for name in _INDEX:
            put(name, index[name])
            crc = zlib.crc32(np.ascontiguousarray(index[name]).tobytes(), crc)
        header["index_crc32"] = crc
        body = json.dumps(header, sort_keys=True).encode("utf-8")
        body += b" " * (data_start - prefix_size - len(body))
        f.seek(0)
        f.write(_PREFIX.pack(MAGIC, FORMAT_VERSION, len(body)) + _HEADER_CRC.pack(zlib.crc32(body)))
        f.write(body)
        f.truncate(header["file_size"])

    atomic_write(path, write)


def write_proposals(path, entries: Dict[str, Tuple[np.ndarray, Tuple[int, int]]], metadata=None,
                    unreadable: Optional[Dict[str, str]] = None) -> None:
    """Write ``{key: (boxes (N, 4) float, (H, W))}`` to a proposals file (atomically), with the
    images that could not be read as ``{key: reason}`` (keys with boxes must not be among them)."""
    both = sorted(set(entries) & set(unreadable or {}))
    if both:
        raise ValueError(f"images {both[:5]} have proposals and are also listed as unreadable")
    items = sorted(((k.encode("utf-8"), k) for k in entries))
    keys = [kb for kb, _ in items]
    hw = np.array([entries[k][1] for _, k in items], np.uint32).reshape(-1, 2)
    blocks = [to_uint16_boxes(entries[k][0], entries[k][1], k) for _, k in items]
    counts = np.array([len(b) for b in blocks], np.int64)
    _write_file(os.fspath(path), keys, hw, counts, blocks, metadata, unreadable)


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------


class _KeyBytes:
    """Sequence view of the stored keys as bytes (for bisect), decoding nothing up front."""

    def __init__(self, blob: np.ndarray, offsets: np.ndarray):
        self.blob, self.offsets = blob, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> bytes:
        return self.blob[self.offsets[i] : self.offsets[i + 1]].tobytes()


class ProposalStore:
    """Read-only, memory-mapped proposals file (see module doc). Open with :meth:`open`."""

    def __init__(self, path):
        self.path = os.path.abspath(os.fspath(path))
        self._load()

    @classmethod
    def open(cls, path) -> "ProposalStore":
        return cls(path)

    @property
    def unreadable_keys(self) -> List[str]:
        """Keys of the images the generator could not read (sorted); reasons in :attr:`unreadable`."""
        return sorted(self.unreadable)

    def _fail(self, why: str):
        raise ValueError(f"{self.path!r} is not a valid soco_d2 proposals file: {why}")

    def _load(self) -> None:
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"proposals file {self.path!r} does not exist")
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            prefix = f.read(_PREFIX.size)
            if len(prefix) < _PREFIX.size or prefix[:8] != MAGIC:
                self._fail("it does not start with the SOCOPROP signature (write one with tools/generate_proposals.py)")
            _, version, header_len = _PREFIX.unpack(prefix)
            if version not in (1, FORMAT_VERSION):
                self._fail(f"format version {version}; this soco_d2 reads versions 1 and "
                           f"{FORMAT_VERSION} (a newer soco_d2 wrote it, or the version is damaged)")
            header_crc = None
            if version >= 2:
                stored = f.read(_HEADER_CRC.size)
                header_crc = _HEADER_CRC.unpack(stored)[0] if len(stored) == _HEADER_CRC.size else -1
            body = f.read(header_len)
        if header_crc is not None and zlib.crc32(body) != header_crc:
            self._fail(f"its header is damaged or truncated (its checksum does not match); {_REGENERATE}")
        try:
            header = json.loads(body.decode("utf-8"))
            arrays = header["arrays"]
            expected = int(header["file_size"])
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError):
            self._fail("its header is damaged or truncated")
        if size != expected:
            self._fail(f"it has {size} bytes but its header says {expected} (truncated or incompletely copied)")
        self.version = version
        data_start = _align(_PREFIX.size + (_HEADER_CRC.size if version >= 2 else 0) + header_len)
        self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        views = {}
        for name, dtype, tail in _ARRAYS:
            if name not in arrays and version == 1 and name == "box_crc":
                continue
            spec = arrays[name]
            count = int(np.prod(spec["shape"]))
            start = data_start + int(spec["offset"])
            if start + count * np.dtype(dtype).itemsize > size:
                self._fail(f"array {name!r} runs past the end of the file")
            views[name] = np.frombuffer(self._mmap, dtype, count, start).reshape(spec["shape"])
        self.header = header
        self.metadata: dict = header.get("metadata", {})
        self.unreadable: Dict[str, str] = dict(header.get("unreadable", {}))
        self._key_offsets = views["key_offsets"]
        self._image_hw = views["image_hw"]
        self._box_offsets = views["box_offsets"]
        self._boxes = views["boxes"]
        self._keys = _KeyBytes(views["key_blob"], self._key_offsets)
        self._box_crc = views.get("box_crc")
        if version >= 2:
            crc = 0
            for name in _INDEX:
                crc = zlib.crc32(views[name], crc)
            if crc != header.get("index_crc32"):
                self._fail("its index (keys, image sizes, box counts) does not match its "
                           f"checksum: the file is damaged; {_REGENERATE}")
        elif self.path not in _warned_unverified:
            _warned_unverified.add(self.path)
            logger.warning("%s is a proposals file of format version 1, without checksums: it is "
                           "read unverified. 'tools/generate_proposals.py --merge NEW %s' writes a "
                           "copy with checksums.", self.path, self.path)
        n = len(self._image_hw)
        if len(self._box_offsets) != n + 1 or self._box_offsets[-1] != len(self._boxes):
            self._fail("its box offsets do not match its box count")

    # pickling (DataLoader workers): reopen by path, never copy the arrays
    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.path = state["path"]
        self._load()

    def __len__(self) -> int:
        return len(self._image_hw)

    def __repr__(self) -> str:
        return f"ProposalStore({self.path!r}, {len(self)} images, {self.num_boxes} boxes)"

    @property
    def num_boxes(self) -> int:
        return len(self._boxes)

    @property
    def keys(self) -> List[str]:
        """All image keys, sorted (decoded on each call)."""
        return [self._keys[i].decode("utf-8") for i in range(len(self))]

    def index(self, key: str) -> int:
        """Row of ``key``, or -1 when absent (binary search over the mapped keys)."""
        kb = key.encode("utf-8")
        i = bisect.bisect_left(self._keys, kb)
        return i if i < len(self) and self._keys[i] == kb else -1

    def __contains__(self, key: str) -> bool:
        return self.index(key) >= 0

    def get(self, key: str) -> Optional[np.ndarray]:
        """float32 (N, 4) boxes x1, y1, x2, y2 of ``key`` (N may be 0), or None if ``key`` is absent."""
        i = self.index(key)
        return None if i < 0 else self.boxes_at(i)

    def boxes_at(self, i: int) -> np.ndarray:
        """float32 (N, 4) boxes of row ``i``, checked against their checksum."""
        boxes = self._boxes[self._box_offsets[i] : self._box_offsets[i + 1]]
        if self._box_crc is not None and zlib.crc32(boxes.tobytes()) != self._box_crc[i]:
            self._fail(f"the boxes of image {self.key_at(i)!r} do not match their checksum: the "
                       f"file is damaged; {_REGENERATE}")
        return boxes.astype(np.float32)

    def key_at(self, i: int) -> str:
        return self._keys[i].decode("utf-8")

    def image_size(self, key: str) -> Tuple[int, int]:
        """(H, W) of the image the boxes of ``key`` were computed on."""
        i = self.index(key)
        if i < 0:
            raise KeyError(f"image key {key!r} is not in the proposals file {self.path!r}")
        h, w = self._image_hw[i]
        return int(h), int(w)

    def box_counts(self) -> np.ndarray:
        """Number of boxes of every image, in key order."""
        return np.diff(self._box_offsets)


# ------------------------------------------------------------------------------------------------
# Merging and incremental writing
# ------------------------------------------------------------------------------------------------


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + c)`` for each (s, c), vectorised."""
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    first = np.cumsum(counts) - counts
    return np.arange(total, dtype=np.int64) - np.repeat(first - starts, counts)


def _merge_stores(stores: Sequence[ProposalStore], output: str, metadata, block: int = 1 << 16) -> None:
    keys: List[bytes] = []
    src_store, src_row = [], []
    for s_id, store in enumerate(stores):
        keys.extend(store._keys[i] for i in range(len(store)))
        src_store.append(np.full(len(store), s_id, np.int64))
        src_row.append(np.arange(len(store), dtype=np.int64))
    src_store = np.concatenate(src_store) if src_store else np.zeros(0, np.int64)
    src_row = np.concatenate(src_row) if src_row else np.zeros(0, np.int64)
    order = sorted(range(len(keys)), key=keys.__getitem__)  # Timsort merges the sorted runs

    keep = []
    for j, i in enumerate(order):
        if j and keys[i] == keys[order[j - 1]]:
            prev = order[j - 1]
            a, ra = stores[src_store[prev]], src_row[prev]
            b, rb = stores[src_store[i]], src_row[i]
            same = np.array_equal(a._image_hw[ra], b._image_hw[rb]) and np.array_equal(
                a._boxes[a._box_offsets[ra] : a._box_offsets[ra + 1]],
                b._boxes[b._box_offsets[rb] : b._box_offsets[rb + 1]],
            )
            if not same:
                raise ValueError(
                    f"image {keys[i].decode('utf-8')!r} has different proposals in {a.path!r} "
                    f"and {b.path!r}; merge only shards of one run"
                )
            continue
        keep.append(i)
    keep = np.asarray(keep, np.int64)
    out_store, out_row = src_store[keep], src_row[keep]
    hw = np.zeros((len(keep), 2), np.uint32)
    counts = np.zeros(len(keep), np.int64)
    starts = np.zeros(len(keep), np.int64)
    for s_id, store in enumerate(stores):
        sel = out_store == s_id
        hw[sel] = store._image_hw[out_row[sel]]
        starts[sel] = store._box_offsets[out_row[sel]]
        counts[sel] = store._box_offsets[out_row[sel] + 1] - starts[sel]

    def blocks():
        for b0 in range(0, len(keep), block):
            b1 = min(b0 + block, len(keep))
            out = np.empty((int(counts[b0:b1].sum()), 4), np.uint16)
            for s_id, store in enumerate(stores):
                mine = out_store[b0:b1] == s_id
                if mine.any():
                    sel = np.flatnonzero(mine) + b0
                    out[np.repeat(mine, counts[b0:b1])] = store._boxes[_ranges(starts[sel], counts[sel])]
            yield out

    # An image unreadable in one input but with boxes in another (read after a fix) has boxes.
    unreadable = {k: r for s in stores for k, r in s.unreadable.items()}
    for k in list(unreadable):
        if any(s.index(k) >= 0 for s in stores):
            del unreadable[k]
    expected = np.full(len(keep), -1, np.int64)  # the inputs' checksums, where they have them
    for s_id, store in enumerate(stores):
        sel = out_store == s_id
        if store._box_crc is not None:
            expected[sel] = store._box_crc[out_row[sel]]
    try:
        _write_file(output, [keys[i] for i in keep], hw, counts, blocks(), metadata, unreadable,
                    expected)
    except ValueError as e:
        raise ValueError(f"cannot merge {[s.path for s in stores]}: {e}; {_REGENERATE}") from None


def _merged_metadata(stores: Sequence[ProposalStore]) -> dict:
    metas = [s.metadata for s in stores]
    if all(m == metas[0] for m in metas):
        return dict(metas[0]) if metas else {}
    return {"merged_inputs": metas}


def merge_proposals(inputs: Sequence[str], output: str, block_images: int = 1 << 16) -> None:
    """Merge proposals files (e.g. the shards of one run) into ``output`` (written atomically).

    A key present in several inputs must have identical boxes and size everywhere (else
    ``ValueError`` naming the key and files). Boxes are copied ``block_images`` images at a time.
    """
    if not inputs:
        raise ValueError("merge_proposals needs at least one input file")
    stores = [ProposalStore.open(p) for p in inputs]
    _merge_stores(stores, os.fspath(output), _merged_metadata(stores), block_images)


class ProposalWriter:
    """Incremental, resumable writer of one proposals file.

    Entries are buffered and written as chunk files (each a complete proposals file, written
    atomically) into the folder ``<output>.parts/`` every ``chunk_size`` images; :meth:`close`
    merges the chunks (and a previous ``output`` when resuming) into ``output`` and removes the
    folder. A killed run loses only the unwritten buffer; an exception inside a ``with`` block
    flushes the buffer first. Images that could not be read are recorded with
    :meth:`add_unreadable`. With ``resume=True`` the images already in ``output`` or in its
    chunks (with boxes or recorded as unreadable) are listed in :attr:`done_keys`; the
    generation metadata must then match.
    """

    def __init__(self, output, chunk_size: int = 1000, resume: bool = False, metadata: Optional[dict] = None):
        self.output = os.path.abspath(os.fspath(output))
        self.parts_dir = self.output + ".parts"
        self.chunk_size = int(chunk_size)
        self.metadata = dict(metadata or {})
        self._buffer: Dict[str, Tuple[np.ndarray, Tuple[int, int]]] = {}
        self._unreadable: Dict[str, str] = {}
        self.done_keys: Set[str] = set()
        self._next_chunk = 0
        existing = self._existing_files()
        if existing and not resume:
            raise FileExistsError(
                f"{existing[0]!r} already exists: pass resume=True (--resume) to continue that run, "
                "or delete it"
            )
        for path in existing:
            store = ProposalStore.open(path)
            if self.metadata and store.metadata and store.metadata != self.metadata:
                raise ValueError(
                    f"cannot resume: {path!r} was generated with {store.metadata}, "
                    f"this run uses {self.metadata}"
                )
            self.done_keys.update(store.keys)
            self.done_keys.update(store.unreadable)
        os.makedirs(self.parts_dir, exist_ok=True)
        for name in os.listdir(self.parts_dir):
            if name.startswith(".") and name.endswith(".tmp"):  # left by a killed atomic_write
                os.remove(os.path.join(self.parts_dir, name))

    def _chunk_files(self) -> List[str]:
        if not os.path.isdir(self.parts_dir):
            return []
        names = sorted(n for n in os.listdir(self.parts_dir) if n.startswith("chunk-") and n.endswith(".socoprop"))
        if names:
            self._next_chunk = max(self._next_chunk, int(names[-1][6:-9]) + 1)
        return [os.path.join(self.parts_dir, n) for n in names]

    def _existing_files(self) -> List[str]:
        return ([self.output] if os.path.exists(self.output) else []) + self._chunk_files()

    def add(self, key: str, boxes: np.ndarray, image_hw: Tuple[int, int]) -> None:
        """Buffer the boxes (N, 4) of ``key``; writes a chunk when ``chunk_size`` images are buffered."""
        to_uint16_boxes(boxes, image_hw, key)  # validate now, not at flush time
        self._buffer[key] = (np.asarray(boxes), (int(image_hw[0]), int(image_hw[1])))
        self.done_keys.add(key)
        self._maybe_flush()

    def add_unreadable(self, key: str, reason: str) -> None:
        """Record that the image ``key`` could not be read, and why."""
        self._unreadable[key] = str(reason)
        self.done_keys.add(key)
        self._maybe_flush()

    def _maybe_flush(self) -> None:
        if len(self._buffer) + len(self._unreadable) >= self.chunk_size:
            self.flush()

    def flush(self) -> None:
        """Write the buffered entries as one chunk file (atomically)."""
        if not self._buffer and not self._unreadable:
            return
        self._chunk_files()
        path = os.path.join(self.parts_dir, f"chunk-{self._next_chunk:06d}.socoprop")
        write_proposals(path, self._buffer, self.metadata, self._unreadable)
        self._next_chunk += 1
        self._buffer, self._unreadable = {}, {}

    def close(self) -> None:
        """Flush, merge everything into ``output`` and remove the chunk folder."""
        self.flush()
        inputs = self._existing_files()
        stores = [ProposalStore.open(p) for p in inputs]
        _merge_stores(stores, self.output, self.metadata or _merged_metadata(stores))
        del stores
        for path in inputs:
            if path != self.output:
                os.remove(path)
        os.rmdir(self.parts_dir)

    def __enter__(self) -> "ProposalWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.flush()
