"""Listing and reading unlabeled images.

An image source is one of

* a folder tree (ImageNet layout, one sub-folder per class) or a plain folder: every file with an
  image extension (:data:`IMAGE_EXTENSIONS`, any case) is listed, recursively; hidden files and
  hidden folders (names starting with ``.``) are skipped; links are followed and each real file
  (and folder) is listed once, so a link loop cannot multiply the data set; named pipes,
  sockets, devices and broken links are never opened. One log line counts every skipped entry
  by reason and names the extensions that were ignored;
* a ``.txt`` list file: one path per line, absolute or relative to the list file's folder. Blank
  lines and lines starting with ``#`` are ignored; ImageNet-style ``path<TAB>label`` or
  ``path label`` lines are accepted and the label is ignored (a path containing spaces must then be
  tab-separated from its label);
* a ``.zip`` with its ``<name>_map.txt``, or tar shards (one ``.tar`` or a glob pattern): see
  :mod:`soco_d2.data.archives` (keys are the member names);
* a COCO-format ``.json``: the ``file_name`` of every entry of ``images``, relative to
  ``image_root``. When ``image_root`` is not given it is the folder named after the json's split
  next to the json's folder if that exists (``annotations/instances_train2017.json`` ->
  ``../train2017``), else the json's own folder.

A builtin name (:data:`BUILTIN_IMAGE_SOURCES`, e.g. ``imagenet_train``) stands for its folder
under ``$SOCO_DATASETS`` (default ``./datasets``), e.g. ``imagenet/train/<class>/<image>``.

Images are identified by a *key*: their path relative to :attr:`ImageList.root`, with ``/``
separators. Keys, not absolute paths, are what proposals files store, so a proposals file stays
valid when the dataset moves to another machine.
"""
from __future__ import annotations

import collections
import contextlib
import errno
import io
import json
import logging
import os
import stat
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_EXTENSIONS",
    "BUILTIN_IMAGE_SOURCES",
    "resolve_image_source",
    "UnreadableImageError",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "read_image",
    "read_image_reduced",
    "ImageList",
    "list_images",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# Unlabeled image sources by name, relative to $SOCO_DATASETS.
BUILTIN_IMAGE_SOURCES = {
    "imagenet_train": "imagenet/train",
    "imagenet_val": "imagenet/val",
    "coco_2017_train": "coco/train2017",
    "coco_2017_unlabeled": "coco/unlabeled2017",
    "coco_mini_train": "coco_mini/train2017",
    "coco_mini_val": "coco_mini/val2017",
    "pennfudan": "pennfudan/PNGImages",
    "caltech101_subset": "caltech101_subset",
}


# Pillow's own refusal threshold (twice ``PIL.Image.MAX_IMAGE_PIXELS``): 13400 x 13400 pixels,
# 537 MB as RGB. Larger files are refused from their header, before any pixel is decoded.
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970


class UnreadableImageError(Exception):
    """An image file that cannot be decoded (missing, truncated, corrupt or unsupported)."""

    def __init__(self, path: str, reason: str):
        self.path = str(path)
        self.reason = str(reason)
        super().__init__(f"cannot read image {self.path!r}: {self.reason}")

    def __reduce__(self):  # keep (path, reason) when sent between processes
        return (type(self), (self.path, self.reason))


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Scale an integer or float image of any depth to uint8 (full range to full range)."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.uint16:
        # Round-to-nearest of x * 255 / 65535 (x / 257 exactly maps 65535 -> 255, 257 -> 1).
        return ((array.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if array.dtype == np.int8:
        return (array.astype(np.int16) + 128).astype(np.uint8)
    if array.dtype == np.int16:
        return ((array.astype(np.int32) + 32768) >> 8).astype(np.uint8)
    if array.dtype in (np.int32, np.uint32):
        top = float(max(int(array.max()), 1))
        return np.clip(np.rint(array.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        # Float images (TIFF, EXR, PFM) are taken to be on a 0..1 scale.
        return np.clip(np.rint(np.nan_to_num(array) * 255.0), 0, 255).astype(np.uint8)
    raise ValueError(f"unsupported pixel type {array.dtype}")


def _decode_cv2(data: np.ndarray) -> Optional[np.ndarray]:
    """OpenCV decode, keeping the raw pixel grid (IMREAD_UNCHANGED ignores EXIF orientation)."""
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        return None
    image = _to_uint8(image)
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    channels = image.shape[2]
    if channels == 1:
        return cv2.cvtColor(image[:, :, 0], cv2.COLOR_GRAY2RGB)
    if channels == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if channels == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)  # alpha is dropped
    return None


@contextlib.contextmanager
def _bomb_warning_silenced(max_pixels: Optional[int]):
    """Pillow's ``DecompressionBombWarning`` (above ``Image.MAX_IMAGE_PIXELS``) ignored when our
    own ``max_pixels`` limit decides (it is checked from the header first); kept without one."""
    if not max_pixels:
        yield
        return
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def _decode_pil(data: np.ndarray, max_pixels: Optional[int] = None) -> np.ndarray:
    """Pillow decode for what OpenCV cannot read; raises on truncated or corrupt data."""
    from PIL import Image

    with _bomb_warning_silenced(max_pixels), Image.open(io.BytesIO(data.tobytes())) as image:
        image.load()  # Pillow refuses truncated files unless ImageFile.LOAD_TRUNCATED_IMAGES
        if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            return cv2.cvtColor(_to_uint8(np.asarray(image)), cv2.COLOR_GRAY2RGB)
        if image.mode != "RGB":
            image = image.convert("RGB")  # palette, grayscale, CMYK, YCbCr, LA, RGBA (alpha dropped)
        return np.array(image, dtype=np.uint8)


def _read_header(path: str, data, max_pixels: Optional[int]) -> Optional[Tuple[int, int, str]]:
    """``(height, width, mode)`` from the file's header (Pillow decodes no pixel for this), or
    None when Pillow does not know the format. Raises :class:`UnreadableImageError` when the
    declared size is above ``max_pixels`` (a decompression bomb, or an image too large to hold)."""
    from PIL import Image

    source = io.BytesIO(data.tobytes()) if isinstance(data, np.ndarray) else path
    try:
        with _bomb_warning_silenced(max_pixels), Image.open(source) as im:
            (w, h), mode = im.size, im.mode
    except Image.DecompressionBombError as e:
        # Pillow refuses above 2 * Image.MAX_IMAGE_PIXELS; below our own limit, OpenCV decides.
        if max_pixels and max_pixels <= 2 * (Image.MAX_IMAGE_PIXELS or 0):
            raise UnreadableImageError(path, _too_large(str(e), max_pixels)) from None
        return None
    except MemoryError:
        raise UnreadableImageError(path, "out of memory while reading its header") from None
    except Exception:  # unknown to Pillow or a damaged header: the decoders decide
        return None
    if max_pixels and w * h > max_pixels:
        raise UnreadableImageError(path, _too_large(f"{w}x{h} = {w * h} pixels", max_pixels))
    return h, w, mode


def _too_large(declared: str, max_pixels: int) -> str:
    return (f"its header declares {declared}, more than the limit of {max_pixels} pixels "
            "(INPUT.MAX_IMAGE_PIXELS in configs, --max-pixels in tools/generate_proposals.py); "
            "raise the limit if the machine has the memory, or shrink the file")


def _kind_of(mode: int) -> str:
    """What a non-regular file is, in words."""
    for test, name in ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"


def _read_regular_file(path: str) -> np.ndarray:
    """The bytes of ``path`` as uint8, refusing anything but a regular file before reading.

    The file is opened without blocking (``O_NONBLOCK``: opening a named pipe would otherwise
    wait for a writer forever; it changes nothing for a regular file) and checked with
    ``fstat`` on the open descriptor, so a file swapped for a pipe after listing is refused too.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, f"{_kind_of(mode)}, not a regular file: never read")
        return np.fromfile(f, dtype=np.uint8)


def _source_name(source) -> str:
    """The path of a file, or ``<archive>@/<member>`` of an archive member (for messages)."""
    return str(source) if hasattr(source, "read_bytes") and not isinstance(source, os.PathLike) \
        else os.fspath(source)


def _read_source(source) -> np.ndarray:
    """The bytes of a file path or of an object with ``read_bytes()`` (an archive member)."""
    if hasattr(source, "read_bytes") and not isinstance(source, os.PathLike):
        return np.frombuffer(source.read_bytes(), dtype=np.uint8)
    return _read_regular_file(os.fspath(source))


def read_image(source, max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Read an image file (a path, or an archive member: see :meth:`ImageList.source`) as an RGB
    ``uint8`` array of shape (H, W, 3).

    * grayscale and palette images are expanded to RGB, CMYK is converted to RGB;
    * 16-bit images are scaled to 8 bits (``round(x * 255 / 65535)``), float images from 0..1;
    * an alpha channel is dropped (as Pillow's ``convert("RGB")`` and torchvision's readers do);
    * the EXIF orientation tag is **not** applied: the array is the stored pixel grid, so boxes
      computed on it (proposals) stay valid whatever reader a later stage uses, as long as it
      also keeps the stored grid;
    * every failure raises :class:`UnreadableImageError` naming the file and the reason: a
      missing, empty, truncated or corrupt file, an unsupported format, any exception of OpenCV
      or Pillow, running out of memory, and a header that declares more than ``max_pixels``
      pixels (checked before decoding; ``None`` or 0: no limit of ours, the decoders' own
      limits still apply).

    OpenCV decodes (fast path); Pillow is the fallback for files OpenCV cannot decode.
    """
    path = _source_name(source)
    try:
        data = _read_source(source)
    except OSError as e:
        raise UnreadableImageError(path, e.strerror or str(e)) from None
    except MemoryError:
        raise UnreadableImageError(path, "out of memory while reading the file") from None
    if data.size == 0:
        raise UnreadableImageError(path, "the file is empty")
    _read_header(path, data, max_pixels)
    try:
        image = _decode_cv2(data)
    except MemoryError:
        raise UnreadableImageError(path, "out of memory while decoding") from None
    except Exception as e:  # cv2.error (OpenCV 5 raises where 4.x returned None), ValueError
        cv2_error = f"OpenCV: {str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}"
        image = None
    else:
        cv2_error = ""
    if image is not None:
        return image
    try:
        image = _decode_pil(data, max_pixels)
    except MemoryError:
        raise UnreadableImageError(path, "out of memory while decoding") from None
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, ... on bad data
        from PIL import UnidentifiedImageError

        why = "no known image format" if isinstance(e, UnidentifiedImageError) else str(e)
        extra = f"; {cv2_error}" if cv2_error else ""
        raise UnreadableImageError(
            path, f"truncated, corrupt or unsupported image data ({why}{extra})") from None
    if image.ndim != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise UnreadableImageError(path, f"decoded to an empty array of shape {image.shape}")
    return image


# ------------------------------------------------------------------------------------------------
# Listing
# ------------------------------------------------------------------------------------------------


class ImageList:
    """A sorted list of image keys (posix paths relative to ``root``)."""

    def __init__(self, root: str, keys: Sequence[str]):
        self.root = os.path.abspath(os.fspath(root))
        self.keys: List[str] = sorted(set(keys))
        self._index: Optional[Dict[str, int]] = None

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: str) -> bool:
        return self._lookup().get(key) is not None

    def __repr__(self) -> str:
        return f"ImageList(root={self.root!r}, {len(self.keys)} images)"

    def path(self, i: int) -> str:
        """Absolute path of the i-th image."""
        return os.path.join(self.root, *self.keys[i].split("/"))

    def source(self, i: int):
        """What :func:`read_image` reads for the i-th image: its path here; an archive member
        in the image lists of :mod:`soco_d2.data.archives`."""
        return self.path(i)

    def subset(self, keys: Sequence[str]) -> "ImageList":
        """The same kind of list, of ``keys`` only."""
        return ImageList(self.root, keys)

    def index_of(self, key: str) -> int:
        index = self._lookup().get(key)
        if index is None:
            raise KeyError(f"image key {key!r} is not in the image list rooted at {self.root!r}")
        return index

    def _lookup(self) -> Dict[str, int]:
        if self._index is None:
            self._index = {k: i for i, k in enumerate(self.keys)}
        return self._index

    def __getstate__(self):
        return {"root": self.root, "keys": self.keys}

    def __setstate__(self, state):
        self.root, self.keys, self._index = state["root"], state["keys"], None



_REDUCED_FLAGS = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                  (2, cv2.IMREAD_REDUCED_COLOR_2))


def read_image_reduced(path, min_long_side: Optional[int],
                       max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS):
    """``(image, (H, W))``: the image at reduced resolution and its full size.

    A JPEG is decoded at 1/8, 1/4 or 1/2 scale by libjpeg's DCT scaling (several times cheaper
    than a full decode), the smallest whose long side is still >= ``min_long_side``; like
    :func:`read_image`, EXIF orientation is not applied. Other formats, JPEGs that are not
    RGB / grayscale (CMYK) and anything that fails this way are read in full with
    :func:`read_image`, whose errors (:class:`UnreadableImageError`) and pixel limit apply.
    """
    name = _source_name(path)
    if min_long_side and name.lower().endswith((".jpg", ".jpeg")):
        try:
            data = _read_source(path)
        except (OSError, MemoryError):  # the full read below reports what is wrong
            data = None
        header = None
        if data is not None and data.size > 0:
            header = _read_header(name, data, max_pixels)  # decodes no pixel
        h, w, mode = header or (0, 0, "")
        for factor, flag in _REDUCED_FLAGS:
            if mode in ("RGB", "L") and -(-max(h, w) // factor) >= min_long_side:
                try:
                    img = cv2.imdecode(data, flag | cv2.IMREAD_IGNORE_ORIENTATION)
                except Exception:  # the full read below reports what is wrong with the file
                    img = None
                if img is not None and img.ndim == 3:
                    return np.ascontiguousarray(img[:, :, ::-1]), (h, w)
                break
    image = read_image(path, max_pixels)
    return image, image.shape[:2]


def _is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


class _Skipped:
    """What a listing left out, and why: counted per reason and per ignored extension."""

    def __init__(self):
        self.reasons = collections.Counter()
        self.extensions = collections.Counter()

    def add(self, reason: str, count: int = 1) -> None:
        self.reasons[reason] += count

    def report(self, source: str) -> None:
        """One log line (a warning when entries other than foreign extensions were skipped)."""
        parts = [f"{n} {why}" for why, n in sorted(self.reasons.items())]
        if self.extensions:
            shown = ", ".join(f"{ext or '(none)'} ({n})" for ext, n in self.extensions.most_common(10))
            more = len(self.extensions) - 10
            parts.append(f"{sum(self.extensions.values())} with another extension: {shown}"
                         + (f" and {more} more" if more > 0 else ""))
        if not parts:
            return
        total = sum(self.reasons.values()) + sum(self.extensions.values())
        level = logging.WARNING if self.reasons else logging.INFO
        logger.log(level, "Listing %r: %d entries skipped: %s. Accepted image extensions (any "
                   "case): %s.", source, total, "; ".join(parts), " ".join(IMAGE_EXTENSIONS))


def _list_folder(folder: str) -> ImageList:
    """Every regular file with an image extension under ``folder``, each real file once.

    Written with ``os.scandir`` rather than ``os.walk(followlinks=True)``, which neither stops
    at a link loop nor tells a regular file from a named pipe without another ``stat`` per
    file. Links are resolved; what is not a regular file (named pipe, socket, device, broken
    link) is never opened, a folder or file reached a second time (a link loop, a second link
    to it, hard links) is listed once, and every skipped entry is counted by reason.
    """
    found, skipped, seen_dirs = [], _Skipped(), set()
    root = os.stat(folder)
    seen_dirs.add((root.st_dev, root.st_ino))
    stack = [("", folder, root.st_dev)]
    while stack:
        prefix, path, dev = stack.pop()
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError as e:
            skipped.add(f"folder(s) that could not be listed ({e.strerror})")
            continue
        subdirs = []
        for entry in entries:
            if entry.name.startswith("."):
                skipped.add("hidden (name starting with '.')")
                continue
            try:
                if entry.is_symlink():
                    st = entry.stat()  # follows the link
                    mode, ident = st.st_mode, (st.st_dev, st.st_ino)
                elif entry.is_dir(follow_symlinks=False):  # no system call: the entry's type
                    st = entry.stat(follow_symlinks=False)
                    mode, ident = st.st_mode, (st.st_dev, st.st_ino)
                else:
                    mode = None if entry.is_file(follow_symlinks=False) else entry.stat(
                        follow_symlinks=False).st_mode
                    ident = (dev, entry.inode())
            except FileNotFoundError:
                skipped.add("broken link(s)")
                continue
            except OSError as e:
                skipped.add(f"entries that could not be examined ({e.strerror})")
                continue
            if mode is not None and stat.S_ISDIR(mode):
                if ident in seen_dirs:
                    skipped.add("folder(s) reached again through a link (a loop or a second link)")
                else:
                    seen_dirs.add(ident)
                    subdirs.append((prefix + entry.name + "/", entry.path, ident[0]))
                continue
            if mode is not None and not stat.S_ISREG(mode):
                skipped.add(f"{_kind_of(mode)} (not a regular file, never opened)")
                continue
            if not _is_image_file(entry.name):
                skipped.extensions[os.path.splitext(entry.name)[1].lower()] += 1
                continue
            found.append((entry.is_symlink(), prefix + entry.name, ident))
        stack.extend(reversed(subdirs))  # depth first, in name order: the same keys every time
    # A file with several names is listed under its first real (not link) name in key order.
    keys, seen_files = [], set()
    for _, key, ident in sorted(found):
        if ident in seen_files:
            skipped.add("file(s) listed already under another name (a link or hard link)")
        else:
            seen_files.add(ident)
            keys.append(key)
    skipped.report(folder)
    return ImageList(folder, keys)


def _keys_under(root: str, paths: Sequence[str]) -> List[str]:
    return [os.path.relpath(p, root).replace(os.sep, "/") for p in paths]


def _check_exist(paths: Sequence[str], source: str) -> None:
    """Every path must be a regular file (after links): a missing one and one that is something
    else (a named pipe, a folder, ...) are named, separately."""
    missing, special = [], []
    for p in paths:
        try:
            mode = os.stat(p).st_mode
        except OSError:
            missing.append(p)
            continue
        if not stat.S_ISREG(mode):
            special.append(f"{p!r} ({_kind_of(mode)})")
    if missing:
        shown = ", ".join(repr(p) for p in missing[:5])
        raise FileNotFoundError(
            f"{len(missing)} of the {len(paths)} images listed in {source!r} do not exist "
            f"(first: {shown}); fix the paths or pass the right image_root"
        )
    if special:
        raise ValueError(
            f"{len(special)} of the {len(paths)} images listed in {source!r} are not regular "
            f"files and would never be read (first: {', '.join(special[:5])}); remove them from "
            "the list"
        )


def read_list_entries(list_file: str) -> List[str]:
    """The image entries of a list or map file: one per line (``name``, ``name<TAB>label`` or
    ``name label``; the last field is dropped when it looks like a label), blank lines and
    ``#`` comments skipped."""
    entries = []
    with open(list_file, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if "\t" in line:
                entries.append(line.split("\t", 1)[0].strip())
                continue
            parts = line.rsplit(None, 1)
            entries.append(parts[0] if len(parts) == 2 and not _is_image_file(parts[1]) else line)
    return entries


def _list_file(list_file: str, check_exists: bool) -> ImageList:
    base = os.path.dirname(os.path.abspath(list_file))
    paths = [os.path.normpath(os.path.join(base, e)) for e in read_list_entries(list_file)]
    if check_exists:
        _check_exist(paths, list_file)
    # Keys relative to the list file's folder when every image lies under it (portable lists),
    # else relative to the images' common folder.
    if all(os.path.commonpath([base, p]) == base for p in paths):
        root = base
    else:
        root = os.path.commonpath([os.path.dirname(p) for p in paths])
    return ImageList(root, _keys_under(root, paths))


def default_coco_image_root(json_file: str) -> str:
    """The image folder of a COCO json given by path, first match of:

    1. ``<json folder>/../<split>`` for ``*_<split>.json`` (COCO: ``annotations/instances_val2017.json``
       -> ``val2017/``);
    2. the json's folder, if it holds the json's first image;
    3. the one sibling of the json's folder that holds the json's first image (Penn-Fudan:
       ``annotations/instances_train.json`` -> ``PNGImages/``);
    4. the json's folder (a missing image is then reported by whoever reads it).
    """
    folder = os.path.dirname(os.path.abspath(json_file))
    stem = os.path.splitext(os.path.basename(json_file))[0]
    split = stem.rsplit("_", 1)[-1]
    candidate = os.path.join(os.path.dirname(folder), split)
    if split and os.path.isdir(candidate):
        return candidate
    first = _first_file_name(json_file)
    if first is None or os.path.isfile(os.path.join(folder, first)):
        return folder
    parent = os.path.dirname(folder)
    try:
        siblings = sorted(e.path for e in os.scandir(parent) if e.is_dir() and e.path != folder)
    except OSError:
        return folder
    holding = [d for d in siblings if os.path.isfile(os.path.join(d, first))]
    return holding[0] if len(holding) == 1 else folder


def _first_file_name(json_file: str) -> Optional[str]:
    """``file_name`` of the first image of a COCO json; None when it cannot be read."""
    try:
        with open(json_file, encoding="utf-8") as f:
            data = json.load(f)
        name = data["images"][0]["file_name"]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None
    return name if isinstance(name, str) else None


def _list_coco(json_file: str, image_root: Optional[str], check_exists: bool) -> ImageList:
    try:
        with open(json_file, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{json_file!r} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{json_file!r} is not a COCO-format json: it has no 'images' list")
    root = os.path.abspath(image_root) if image_root else default_coco_image_root(json_file)
    try:
        names = [img["file_name"] for img in data["images"]]
    except (KeyError, TypeError):
        raise ValueError(f"{json_file!r}: every entry of 'images' needs a 'file_name'") from None
    paths = [os.path.normpath(os.path.join(root, n)) for n in names]
    if check_exists:
        _check_exist(paths, json_file)
    if any(os.path.commonpath([root, p]) != root for p in paths):
        raise ValueError(f"{json_file!r}: some file_name entries point outside the image root {root!r}")
    return ImageList(root, _keys_under(root, paths))


def resolve_image_source(source) -> str:
    """``source`` itself, or the folder a builtin name stands for (see module doc)."""
    source = os.fspath(source)
    if source in BUILTIN_IMAGE_SOURCES and not os.path.exists(source):
        return os.path.join(os.environ.get("SOCO_DATASETS", "datasets"), BUILTIN_IMAGE_SOURCES[source])
    return source


def list_images(source, image_root: Optional[str] = None, check_exists: bool = True) -> ImageList:
    """List the images of ``source`` (folder, ``.txt`` list file, COCO ``.json``, builtin name,
    or a ``.zip`` / ``.tar`` archive source of :mod:`soco_d2.data.archives`; see module doc).

    ``image_root`` applies to COCO json sources only. ``check_exists`` verifies that every image
    named by a list file or json exists (one ``stat`` per image).
    """
    from .archives import archive_kind, list_archive  # archives build on this module

    if archive_kind(source):
        return list_archive(os.fspath(source))
    name, source = os.fspath(source), resolve_image_source(source)
    if not os.path.exists(source):
        if name != source:
            raise FileNotFoundError(
                f"builtin image source {name!r} is {source!r}, which does not exist: "
                "set $SOCO_DATASETS to the folder holding it"
            )
        raise FileNotFoundError(
            f"image source {source!r} does not exist (builtin names: {', '.join(sorted(BUILTIN_IMAGE_SOURCES))})"
        )
    if os.path.isdir(source):
        images = _list_folder(source)
    elif source.lower().endswith(".json"):
        images = _list_coco(source, image_root, check_exists)
    elif source.lower().endswith(".txt"):
        images = _list_file(source, check_exists)
    else:
        raise ValueError(
            f"image source {source!r} is neither a folder, a .txt list file, a COCO .json file, a "
            ".zip (with its _map.txt) nor .tar shards"
        )
    if len(images) == 0:
        raise ValueError(
            f"no images found in {source!r} (accepted extensions, any case: "
            f"{' '.join(IMAGE_EXTENSIONS)}; hidden files are skipped)"
        )
    return images
