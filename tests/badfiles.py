"""A generated corpus of bad and unusual image files, shared by the check-images and extract tests.

``make_bad_corpus(root)`` writes the files into class folders (mix them into ``make_image_folder``)
and returns ``{relative path: BadFile(kind, is_error, listed)}``:

- ``kind``: the check-images kind that must be reported for the file;
- ``is_error``: extract cannot use the file (check-images severity "error", quarantined);
- ``listed``: extract lists the file (it has an image extension and is not hidden). Extract skips
  and records exactly the ``listed and is_error`` files (see ``skipped_by_extract``); the others that
  are errors (``notes.txt``) it never sees. Every ``not is_error`` file is a good image.

It also writes the OS's own files (``OS_FILES``: Thumbs.db, .DS_Store, ...), which are in no listing and
no finding of any command, so they are not among the paths returned.
"""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image


class BadFile(NamedTuple):
    kind: str  # the check-images kind expected for this file
    is_error: bool  # extract cannot use it (quarantined by check-images --quarantine)
    listed: bool  # extract lists it (image extension, not hidden), so it is skipped with a reason


def _noise(mode: str, size=(40, 32), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC over type + data."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A tiny PNG whose header claims width x height RGB pixels (valid CRCs, one token IDAT)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + png_chunk(b"IEND", b""))


def fraction_strips_tiff() -> bytes:
    """A small TIFF whose StripOffsets tag has the RATIONAL type: Pillow's reader raises TypeError (not OSError or
    ValueError) seeking to a fraction, as it did on a mutated TIFF of 1.4 KB."""
    data = bytearray(_encode(Image.new("RGB", (8, 8), (200, 30, 30)), "TIFF"))
    ifd = struct.unpack_from("<I", data, 4)[0]
    for k in range(struct.unpack_from("<H", data, ifd)[0]):
        at = ifd + 2 + 12 * k
        if struct.unpack_from("<H", data, at)[0] == 273:  # StripOffsets
            struct.pack_into("<H", data, at + 2, 5)  # its type: RATIONAL
    return bytes(data)


def gray16_alpha_tiff() -> bytes:
    """A TIFF of 16-bit gray with alpha (BitsPerSample 16, 16), a layout Pillow does not read: it identifies no
    format in it."""
    data = bytearray(_encode(Image.new("LA", (8, 8), (100, 200)), "TIFF"))
    ifd = struct.unpack_from("<I", data, 4)[0]
    for k in range(struct.unpack_from("<H", data, ifd)[0]):
        at = ifd + 2 + 12 * k
        if struct.unpack_from("<H", data, at)[0] == 258:  # BitsPerSample: two shorts, inline
            struct.pack_into("<HH", data, at + 8, 16, 16)
    return bytes(data)


#: The first bytes of photos of formats Pillow does not decode: an iPhone's HEIC, a JPEG XL (codestream).
HEIC_HEAD = b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + bytes(200)
JXL_HEAD = b"\xff\x0a" + bytes(200)


def _corrupt_exif_jpeg() -> bytes:
    """A good JPEG whose EXIF block is cut short: PIL warns when it parses it at open."""
    exif = Image.Exif()
    exif[0x010F] = "Canon"
    exif[0x0110] = "X" * 40
    return _encode(_noise("RGB"), "JPEG", exif=exif.tobytes()[:-10])


def _palette_with_transparency() -> bytes:
    im = _noise("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return _encode(im, "PNG", transparency=0)


def _sixteen_bit() -> bytes:
    arr = (np.arange(40 * 32, dtype=np.uint32).reshape(32, 40) * 50).astype(np.uint16)
    return _encode(Image.fromarray(arr), "PNG")


#: The OS's own files (folders.is_os_file), as Windows and macOS write them.
OS_FILES = {"Thumbs.db": b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\0" * 120, ".DS_Store": b"\0\0\0\1Bud1" + b"\0" * 60}


def make_bad_corpus(root, classes=("blue", "red")) -> dict[str, BadFile]:
    """Write one file of each bad or unusual kind under root/<class>/ (alternating classes)."""
    root = Path(root)
    good_jpeg = _encode(_noise("RGB"), "JPEG", quality=90)
    files = {
        # errors extract skips (listed)
        "bad.zero.jpg": (b"", BadFile("zero-byte", True, True)),
        "bad.truncated.jpg": (good_jpeg[: len(good_jpeg) // 2], BadFile("truncated", True, True)),
        "bad.text.jpg": (b"this is not an image\n" * 10, BadFile("not-an-image", True, True)),
        "bad.bomb.png": (bomb_png(), BadFile("decompression-bomb", True, True)),
        # the OS's own files: no photo and no error, in no listing (their places kept: the classes alternate)
        **{name: (data, None) for name, data in OS_FILES.items()},
        # notes: good images, converted or with a harmless oddity
        "note.png-named.jpg": (_encode(_noise("RGB"), "PNG"), BadFile("extension-mismatch", False, True)),
        "note.gif-named.jpg": (_encode(_noise("RGB").convert("P"), "GIF"), BadFile("extension-mismatch", False, True)),
        "note.cmyk.jpg": (_encode(_noise("CMYK"), "JPEG"), BadFile("non-rgb-mode", False, True)),
        "note.gray.jpg": (_encode(_noise("L"), "JPEG"), BadFile("non-rgb-mode", False, True)),
        "note.rgba.png": (_encode(_noise("RGBA"), "PNG"), BadFile("non-rgb-mode", False, True)),
        "note.palette-transparent.png": (_palette_with_transparency(), BadFile("non-rgb-mode", False, True)),
        "note.16bit.png": (_sixteen_bit(), BadFile("non-rgb-mode", False, True)),
        "note.exif.jpg": (_corrupt_exif_jpeg(), BadFile("decode-warning", False, True)),
        # a real 30000 x 1 picture of a few hundred bytes: its resize to 256 would build 7.7 G pixels
        "bad.thin.png": (_encode(Image.new("RGB", (30000, 1), (90, 90, 90)), "PNG"),
                         BadFile("extreme-aspect", True, True)),
        # an error extract never lists (no image extension), named and moved by check-images
        "notes.txt": (b"shot on 2024-05-01\n", BadFile("not-an-image", True, False)),
    }
    out = {}
    for i, (name, (data, expected)) in enumerate(files.items()):
        rel = f"{classes[i % len(classes)]}/{name}"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        if expected is not None:
            out[rel] = expected
    return out


def skipped_by_extract(corpus: dict[str, BadFile]) -> set[str]:
    """The paths extract must skip and record (listed, unusable)."""
    return {p for p, b in corpus.items() if b.listed and b.is_error}


def usable(corpus: dict[str, BadFile]) -> set[str]:
    """The paths extract must use as good images."""
    return {p for p, b in corpus.items() if not b.is_error}
