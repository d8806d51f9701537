"""Pretraining images inside archives: the official zip layout and tar shards.

A million small files on a shared file system stall the data loaders; the official SoCo code
(like Swin and PixPro) reads ImageNet from one zip, large-scale pretraining code from tar shards.
Both are image sources here (``DATASETS.PRETRAIN.IMAGE_ROOT``, ``tools/generate_proposals.py
--images``, :func:`~soco_d2.data.image_list.list_images`):

* **zip** -- ``train.zip`` with its map file ``train_map.txt`` next to it (one line per image:
  the member name, then optionally a tab or space and a label, which is ignored). Members are
  read by name through one ``zipfile.ZipFile`` per process, opened lazily at the first read in
  that process (after the DataLoader forked its workers), as the official ``ZipReader`` does.
* **tar shards** -- one ``.tar`` file or a glob pattern of them (``shards/train-*.tar``), in the
  WebDataset layout: every image is a member (by its extension); other members (``.cls``
  labels, ``.json`` metadata) are ignored. Each shard gets an index of its image members
  (name, data offset, size), built once by scanning its headers with :mod:`tarfile` and cached
  beside it as ``<shard>.index.json``, with the shard's size and modification time: an index
  whose shard changed since is rebuilt (with a warning). A member is then one ``seek`` and one
  ``read`` of an already open file.

Why a small index and not ``webdataset`` / ``wids``: webdataset streams shards in order, which
cannot serve the resumable ``(index, seed)`` sampler (any image, any order, exact resume);
wids does give random access, but needs its own shard-list JSON, groups members into samples,
and would be a new dependency, for what a :mod:`tarfile` scan into (name, offset, size) does.

Keys are member names, which are the image paths relative to the packed folder (what
``datasets/pack_imagenet.py`` writes): the keys, hence the proposals files, of a folder and of
its zip or tar shards are the same. An image is named ``<archive>@/<member>`` in messages (the
official ``ZipReader`` notation). An unreadable member follows the contract of an unreadable
file (:class:`~soco_d2.data.image_list.UnreadableImageError`: logged once, counted, skipped).
"""
from __future__ import annotations

import collections
import glob
import json
import logging
import os
import tarfile
import zipfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from soco_d2.utils.fileio import atomic_write_text

from .image_list import IMAGE_EXTENSIONS, ImageList, read_list_entries

__all__ = [
    "ArchiveMember",
    "ArchiveChangedError",
    "ZipImageList",
    "TarImageList",
    "archive_kind",
    "list_archive",
    "zip_map_path",
    "read_zip_map",
    "build_tar_index",
    "load_tar_index",
    "write_zip",
    "write_tar_shards",
]

logger = logging.getLogger(__name__)

INDEX_SUFFIX = ".index.json"
INDEX_VERSION = 1
MAX_OPEN_SHARDS = 64  # open tar files kept per process (a large dataset has ~1000 shards)


class ArchiveChangedError(RuntimeError):
    """An archive was replaced or modified after it was listed (its offsets no longer hold)."""


# ------------------------------------------------------------------------------------------------
# Reading members: one open handle per archive and process
# ------------------------------------------------------------------------------------------------

# {archive path: (pid, handle)}. The pid makes a forked DataLoader worker open its own handle
# instead of sharing the parent's file offset. Tar handles are kept in least-recently-used
# order and capped (MAX_OPEN_SHARDS), a hand-written cache since closing an evicted file is
# needed (functools.lru_cache cannot).
_zip_handles: Dict[str, Tuple[int, zipfile.ZipFile]] = {}
_tar_handles: "collections.OrderedDict[str, Tuple[int, object]]" = collections.OrderedDict()


def _zip_handle(path: str) -> zipfile.ZipFile:
    entry = _zip_handles.get(path)
    if entry is None or entry[0] != os.getpid():
        entry = _zip_handles[path] = (os.getpid(), zipfile.ZipFile(path))
    return entry[1]


def _tar_handle(path: str, stamp: Tuple[int, int]):
    entry = _tar_handles.get(path)
    if entry is not None and entry[0] == os.getpid():
        _tar_handles.move_to_end(path)
        return entry[1]
    f = open(path, "rb")
    st = os.fstat(f.fileno())
    if stamp and (st.st_size, st.st_mtime_ns) != tuple(stamp):
        f.close()
        raise ArchiveChangedError(
            f"tar shard {path!r} changed after it was indexed (size, mtime {tuple(stamp)} -> "
            f"{(st.st_size, st.st_mtime_ns)}): the member offsets no longer hold. Restart the run "
            "(the index is rebuilt at start) and do not rewrite shards during a run.")
    _tar_handles[path] = (os.getpid(), f)
    while len(_tar_handles) > MAX_OPEN_SHARDS:
        _, (pid, old) = _tar_handles.popitem(last=False)
        if pid == os.getpid():
            old.close()
    return f


@dataclass(frozen=True)
class ArchiveMember:
    """An image inside an archive: what :func:`~soco_d2.data.image_list.read_image` reads.

    ``offset`` / ``size`` / ``stamp`` (shard size and mtime_ns) locate a tar member; a zip
    member is found by name."""

    archive: str
    name: str
    offset: int = -1
    size: int = -1
    stamp: Tuple[int, int] = ()

    def __str__(self) -> str:
        return f"{self.archive}@/{self.name}"

    def read_bytes(self) -> bytes:
        """The member's bytes; ``OSError`` naming the archive and member when it cannot be read
        (missing, truncated, CRC error). :class:`ArchiveChangedError` for a modified shard."""
        if self.offset < 0:
            try:
                return _zip_handle(self.archive).read(self.name)
            except KeyError:
                raise OSError(f"no member {self.name!r} in {self.archive!r}") from None
            except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError) as e:
                raise OSError(f"member {self.name!r} of {self.archive!r}: {e}") from None
        f = _tar_handle(self.archive, self.stamp)
        f.seek(self.offset)
        data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"member {self.name!r} of {self.archive!r} is truncated "
                          f"({len(data)} of {self.size} bytes)")
        return data


# ------------------------------------------------------------------------------------------------
# Zip: archive + map file
# ------------------------------------------------------------------------------------------------


def zip_map_path(zip_path: str) -> str:
    """``train.zip`` -> ``train_map.txt`` beside it (the official layout)."""
    stem = os.path.splitext(os.path.abspath(zip_path))[0]
    return stem + "_map.txt"


def read_zip_map(map_path: str) -> List[str]:
    """Member names of a map file (``name``, ``name<TAB>label`` or ``name label`` lines)."""
    return read_list_entries(map_path)


class ZipImageList(ImageList):
    """Images of a zip, keyed by member name (see module doc)."""

    def path(self, i: int) -> str:
        return f"{self.root}@/{self.keys[i]}"

    def source(self, i: int) -> ArchiveMember:
        return ArchiveMember(self.root, self.keys[i])

    def subset(self, keys: Sequence[str]) -> "ZipImageList":
        return ZipImageList(self.root, keys)


def _list_zip(zip_path: str) -> ZipImageList:
    map_path = zip_map_path(zip_path)
    if not os.path.isfile(map_path):
        raise FileNotFoundError(
            f"zip image source {zip_path!r} has no map file {map_path!r} next to it (the official "
            "layout: train.zip + train_map.txt, one member name per line, optionally followed by "
            "a label). Write it with: python datasets/pack_imagenet.py --write-map "
            f"{zip_path}")
    names = read_zip_map(map_path)
    try:
        with zipfile.ZipFile(zip_path) as zf:
            present = set(zf.namelist())
    except zipfile.BadZipFile as e:
        raise ValueError(f"{zip_path!r} is not a readable zip archive ({e}); re-copy it") from None
    missing = [n for n in names if n not in present]
    if missing:
        shown = ", ".join(repr(n) for n in missing[:5])
        raise FileNotFoundError(
            f"{len(missing)} of the {len(names)} members named in {map_path!r} are not in "
            f"{zip_path!r} (first: {shown}); the map belongs to another archive or the zip is "
            "incomplete. Rewrite the map with python datasets/pack_imagenet.py --write-map "
            f"{zip_path}, or re-copy the zip")
    return ZipImageList(zip_path, names)


# ------------------------------------------------------------------------------------------------
# Tar shards: an index of member offsets per shard
# ------------------------------------------------------------------------------------------------


def _stamp(path: str) -> Tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def build_tar_index(shard: str) -> Dict:
    """Scan the headers of ``shard``: ``{"version", "size", "mtime_ns", "members": [[name,
    offset, size], ...]}`` for its image members. Raises ``ValueError`` naming the shard and the
    last good member when it is truncated or corrupt."""
    size, mtime_ns = _stamp(shard)
    members: List[List] = []
    last = "(none: the first header)"
    try:
        with tarfile.open(shard, "r:") as tf:
            for m in tf:
                if m.isfile() and m.name.lower().endswith(IMAGE_EXTENSIONS):
                    if m.offset_data + m.size > size:
                        raise ValueError(f"member {m.name!r} ends at byte {m.offset_data + m.size}")
                    members.append([m.name, m.offset_data, m.size])
                last = repr(m.name)
            end = tf.offset  # where the end-of-archive marker (two zero blocks) must be
        with open(shard, "rb") as f:
            f.seek(end)
            marker = f.read(2 * tarfile.BLOCKSIZE)
        if len(marker) < 2 * tarfile.BLOCKSIZE or marker.strip(b"\0"):
            raise ValueError(f"no end-of-archive marker after the member at byte {end}")
    except (tarfile.TarError, ValueError, EOFError) as e:
        raise ValueError(
            f"tar shard {shard!r} is truncated or corrupt after member {last} ({e}); re-copy "
            "or re-pack it (datasets/pack_imagenet.py --format tar)") from None
    return {"version": INDEX_VERSION, "size": size, "mtime_ns": mtime_ns, "members": members}


def load_tar_index(shard: str) -> Dict:
    """The cached index of ``shard`` (``<shard>.index.json``), built (and cached, when the
    folder is writable) if missing, of another version, or stale (the shard's size or
    modification time differ from those recorded)."""
    path = shard + INDEX_SUFFIX
    stamp = _stamp(shard)
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                index = json.load(f)
            if index.get("version") == INDEX_VERSION and (index["size"], index["mtime_ns"]) == stamp:
                return index
            logger.warning(
                "The index %s is stale: shard %s changed after indexing (size, mtime %s -> %s); "
                "rebuilding it.", path, shard, (index.get("size"), index.get("mtime_ns")), stamp)
        except (OSError, ValueError, KeyError, TypeError) as e:
            logger.warning("The index %s is unreadable (%s); rebuilding it.", path, e)
    index = build_tar_index(shard)
    try:
        atomic_write_text(path, json.dumps(index, separators=(",", ":")))
    except OSError as e:
        logger.warning("Cannot cache the index of %s at %s (%s); it is rebuilt at every start.",
                       shard, path, e.strerror or e)
    return index


class TarImageList(ImageList):
    """Image members of tar shards, keyed by member name (see module doc)."""

    def __init__(self, shards: Sequence[str], keys: Sequence[str], shard_ids, offsets, sizes,
                 stamps: Sequence[Tuple[int, int]]):
        order = sorted(range(len(keys)), key=keys.__getitem__)
        sorted_keys = [keys[i] for i in order]
        super().__init__(os.path.commonpath([os.path.dirname(os.path.abspath(s)) for s in shards]),
                         sorted_keys)
        self.shards = [os.path.abspath(s) for s in shards]
        self.stamps = [tuple(s) for s in stamps]
        self.shard_ids = np.asarray(shard_ids, np.int32)[order]
        self.offsets = np.asarray(offsets, np.int64)[order]
        self.sizes = np.asarray(sizes, np.int64)[order]

    def path(self, i: int) -> str:
        return f"{self.shards[self.shard_ids[i]]}@/{self.keys[i]}"

    def source(self, i: int) -> ArchiveMember:
        s = int(self.shard_ids[i])
        return ArchiveMember(self.shards[s], self.keys[i], int(self.offsets[i]),
                             int(self.sizes[i]), self.stamps[s])

    def subset(self, keys: Sequence[str]) -> "TarImageList":
        rows = [self.index_of(k) for k in keys]
        return TarImageList(self.shards, [self.keys[i] for i in rows], self.shard_ids[rows],
                            self.offsets[rows], self.sizes[rows], self.stamps)

    def __getstate__(self):
        return {**super().__getstate__(), "shards": self.shards, "stamps": self.stamps,
                "shard_ids": self.shard_ids, "offsets": self.offsets, "sizes": self.sizes}

    def __setstate__(self, state):
        super().__setstate__(state)
        for k in ("shards", "stamps", "shard_ids", "offsets", "sizes"):
            setattr(self, k, state[k])


def _list_tar(pattern: str) -> TarImageList:
    shards = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    shards = [s for s in shards if os.path.isfile(s)]
    if not shards:
        raise FileNotFoundError(f"no tar shard matches {pattern!r}")
    keys, shard_ids, offsets, sizes, stamps = [], [], [], [], []
    owner: Dict[str, int] = {}
    for s, shard in enumerate(shards):
        index = load_tar_index(shard)
        stamps.append((index["size"], index["mtime_ns"]))
        for name, offset, size in index["members"]:
            if name in owner:
                raise ValueError(f"image member {name!r} is in two shards, {shards[owner[name]]!r} "
                                 f"and {shard!r}; every image must be packed once")
            owner[name] = s
            keys.append(name)
            shard_ids.append(s)
            offsets.append(offset)
            sizes.append(size)
    return TarImageList(shards, keys, shard_ids, offsets, sizes, stamps)


# ------------------------------------------------------------------------------------------------
# Dispatch
# ------------------------------------------------------------------------------------------------


def archive_kind(source: str) -> Optional[str]:
    """``"zip"``, ``"tar"`` (one shard or a glob pattern of shards) or None (not an archive)."""
    lower = os.fspath(source).lower()
    if lower.endswith(".zip"):
        return "zip"
    if lower.endswith(".tar"):
        return "tar"
    return None


def list_archive(source: str) -> ImageList:
    """The :class:`ZipImageList` or :class:`TarImageList` of ``source``."""
    kind = archive_kind(source)
    if kind == "zip":
        if not os.path.isfile(source):
            raise FileNotFoundError(f"zip image source {source!r} does not exist")
        return _list_zip(source)
    if kind == "tar":
        return _list_tar(source)
    raise ValueError(f"{source!r} is neither a .zip nor .tar image source")


# ------------------------------------------------------------------------------------------------
# Packing
# ------------------------------------------------------------------------------------------------


def _labels(keys: Sequence[str]) -> List[int]:
    """Class index of each key: its first folder among the sorted first folders (ImageNet's
    ``<wnid>/<image>``); 0 for keys without a folder."""
    classes = sorted({k.split("/", 1)[0] for k in keys if "/" in k})
    lookup = {c: i for i, c in enumerate(classes)}
    return [lookup.get(k.split("/", 1)[0], 0) if "/" in k else 0 for k in keys]


def write_zip_map(names: Sequence[str], map_path: str) -> None:
    """The map file: ``name<TAB>label`` per member (labels as in :func:`_labels`)."""
    atomic_write_text(map_path, "".join(f"{n}\t{c}\n" for n, c in zip(names, _labels(names))))


def write_zip(images: ImageList, zip_path: str) -> str:
    """Pack ``images`` into ``zip_path`` (stored, not compressed: JPEGs do not shrink, and a
    stored member is read without inflating) plus its map file; returns the map's path."""
    os.makedirs(os.path.dirname(os.path.abspath(zip_path)), exist_ok=True)
    tmp = zip_path + ".tmp"
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for i, key in enumerate(images.keys):
            zf.write(images.path(i), arcname=key)
    os.replace(tmp, zip_path)
    map_path = zip_map_path(zip_path)
    write_zip_map(images.keys, map_path)
    return map_path


def write_zip_map_of(zip_path: str) -> str:
    """Write the map file of an existing zip from its image members; returns its path."""
    with zipfile.ZipFile(zip_path) as zf:
        names = sorted(n for n in zf.namelist() if n.lower().endswith(IMAGE_EXTENSIONS))
    map_path = zip_map_path(zip_path)
    write_zip_map(names, map_path)
    return map_path


def write_tar_shards(images: ImageList, prefix: str, images_per_shard: int = 10000) -> List[str]:
    """Pack ``images`` into ``<prefix>-000000.tar``, ... (WebDataset layout: each image member
    followed by ``<name without extension>.cls``, its label as text), and index each shard.
    Returns the shard paths."""
    if images_per_shard < 1:
        raise ValueError(f"images_per_shard must be >= 1, got {images_per_shard}")
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    labels = _labels(images.keys)
    shards = []
    for start in range(0, len(images), images_per_shard):
        shard = f"{prefix}-{len(shards):06d}.tar"
        tmp = shard + ".tmp"
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
            for i in range(start, min(start + images_per_shard, len(images))):
                key = images.keys[i]
                _add_member(tf, key, _read_file(images.path(i)))
                _add_member(tf, os.path.splitext(key)[0] + ".cls", f"{labels[i]}\n".encode())
        os.replace(tmp, shard)
        load_tar_index(shard)
        shards.append(shard)
    return shards


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    import io

    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # reproducible shards
    tf.addfile(info, io.BytesIO(data))
