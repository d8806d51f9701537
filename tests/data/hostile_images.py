"""A folder of good images mixed with hostile files, generated in a few milliseconds.

``make_hostile_folder(root)`` writes the files and returns ``(good, bad)``: the names that must
read as images and the names that must be reported as unreadable.
"""
import struct
import zlib

import cv2
import numpy as np
from PIL import Image


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG (under 70 bytes) whose IHDR (valid CRC) declares ``width x height`` pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))
            + chunk(b"IEND", b""))


def _rgb(h, w, seed):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)  # smooth blocks: proposals exist
    return np.kron(base, np.ones((h // 4 + 1, w // 4 + 1, 1), np.uint8))[:h, :w]


def make_hostile_folder(root, size: int = 64):
    """Write good images (plain, CMYK, 16-bit, alpha, palette, 1x1, EXIF-rotated) and bad files
    (truncated JPEG, empty, non-image, decompression-bomb header) into ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    good = []
    for i in range(4):
        Image.fromarray(_rgb(size, size + 8 * i, i)).save(root / f"plain{i}.jpg", quality=90)
        good.append(f"plain{i}.jpg")
    Image.fromarray(_rgb(size, size, 10)).convert("CMYK").save(root / "cmyk.jpg", quality=90)
    cv2.imwrite(str(root / "color16.png"), _rgb(size, size, 11).astype(np.uint16) * 257)
    rgba = np.dstack([_rgb(size, size, 12), np.full((size, size), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(root / "alpha.png")
    Image.fromarray(_rgb(size, size, 13)).convert("P", palette=Image.ADAPTIVE, colors=8).save(
        root / "palette.png")
    Image.fromarray(np.full((1, 1, 3), 200, np.uint8)).save(root / "one_pixel.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(_rgb(size // 2, size, 14)).save(root / "exif_rotated.jpg", exif=exif)
    good += ["cmyk.jpg", "color16.png", "alpha.png", "palette.png", "one_pixel.png",
             "exif_rotated.jpg"]

    Image.fromarray(_rgb(size, size, 20)).save(root / "full.tmp.jpg", quality=90)
    data = (root / "full.tmp.jpg").read_bytes()
    (root / "full.tmp.jpg").unlink()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "empty.jpg").write_bytes(b"")
    (root / "not_an_image.png").write_bytes(b"<html><body>404 Not Found</body></html>\n" * 4)
    (root / "bomb.png").write_bytes(bomb_png())
    bad = ["truncated.jpg", "empty.jpg", "not_an_image.png", "bomb.png"]
    return sorted(good), sorted(bad)
