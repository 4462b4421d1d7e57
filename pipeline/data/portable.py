"""The decoding rule: a photo's bytes -> an RGB image -> the network's input, with Pillow and numpy only.

One rule for every consumer of a model. predict, extract, evaluate and serve decode through it
(``data.folders.decode_stream`` calls ``jpeg_draft`` and ``to_rgb``; torchvision's preset then does
what ``resize_crop`` and ``normalise`` do); every export writes its parameters into its metadata
(``"decoding"``: see ``serving.export.metadata``) and its parity check runs ``preprocess`` on each
photo's bytes against predict's path; ``examples/predict_onnx.py`` holds a verbatim copy of the
functions below the line (``tests/test_export.py`` keeps it so). Written out in docs/export-serve.md.

The rule:
1. JPEG whose shorter side is at least 2 x D (D = ``jpeg_draft_min_short_side``, when the model has one):
   decoded at the smallest DCT scale (1/2, 1/4, 1/8) keeping the shorter side >= D (Pillow's ``draft``).
2. To RGB: 16-bit (and 32-bit integer) gray scaled to 8 bits by the file's bit depth, rounded; 32-bit float
   gray (mode F) scaled from [min(0, lowest), max(1, highest)] of its finite samples to 0-255 (a photo in
   [0, 1] keeps its brightness, one in other units is fitted by its own range); transparency (RGBA, LA, PA, a
   palette with a transparent colour) composited over white; every other mode by Pillow's ``convert("RGB")``
   (CMYK, gray, palette, 16-bit RGB as Pillow reads it).
3. Turned upright as the EXIF Orientation tag (2-8) asks, as every viewer shows the photo (Pillow's
   ``ImageOps.exif_transpose`` table; only the tag is read, so a damaged EXIF block that makes
   ``exif_transpose`` raise still turns, and one whose tag cannot be read leaves the pixels as stored).
4. Resize the shorter side to ``resize_size`` (the longer to int(resize_size * long / short)) with Pillow's
   resampling, center crop ``crop_size`` (offsets int(round((side - crop) / 2))), /255 as float32,
   minus mean, divided by std, channels first.
   A JPEG of more pixels than MAX_PIXELS (Pillow's limit; up to MAX_JPEG_PIXELS) is decoded at that scale, or
   at the smallest larger one (2, 4, 8) within MAX_PIXELS (without D: the smallest within it).
An EPS file (Ghostscript), an image more than MAX_ASPECT_RATIO times longer than wide (its resize would be
huge), any other image of more pixels than MAX_PIXELS (a decompression bomb), a file of no bytes and a path
that is no regular file (a named pipe: never opened) are not decoded: the exception's ``decode_failure`` is the
row's reason. A file Pillow cannot read is said to be cut short where its format's ending is missing, and named
where its first bytes tell a format Pillow does not decode (HEIC, JPEG XL): ``failure_reason``.
"""
# Pillow and numpy only below: this file must run where nothing of this project is installed
import io
import os
import stat
import warnings

import numpy as np
from PIL import Image, JpegImagePlugin

# ---- the decoding rule: the same text in pipeline/data/portable.py and examples/predict_onnx.py ----

#: Rows of a 16-bit image scaled to 8 bits at a time (``gray16_to_rgb``): small integer blocks, never a
#: float64 copy of the whole image (a 9400 x 9400 16-bit PNG took predict to 3.1 GB that way).
ROWS_PER_BLOCK = 256
#: The resampling filters torchvision's InterpolationMode names stand for, on a PIL image.
RESAMPLE = {"nearest": Image.Resampling.NEAREST, "nearest-exact": Image.Resampling.NEAREST,
            "bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
            "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING, "lanczos": Image.Resampling.LANCZOS}


def bit_depth(im) -> int:
    """Bits per sample of an integer-mode image: a TIFF's BitsPerSample, else 16 (PNG and PNM keep
    16-bit samples in modes I;16 and I)."""
    bits = getattr(im, "tag_v2", {}).get(258) if hasattr(im, "tag_v2") else None
    if isinstance(bits, tuple):
        bits = bits[0] if bits else None
    return int(bits) if isinstance(bits, int) and 1 <= bits <= 32 else 16


def gray16_to_rgb(im):
    """An integer-mode image (I;16, I;16B, I;16L, I) as RGB gray: each sample v becomes
    round(clip(v, 0, hi) * 255 / hi), hi = 2 ** bit_depth(im) - 1 (from the file, never from its pixels:
    a dark picture stays dark). Computed in int64 as (v * 255 + hi // 2) // hi, which is that rounding
    exactly (hi is odd, so no sample falls half-way), ROWS_PER_BLOCK rows at a time pasted straight into
    the RGB image: no full-size copy in between."""
    hi = 2 ** bit_depth(im) - 1
    rgb = Image.new("RGB", im.size)
    for top in range(0, im.height, ROWS_PER_BLOCK):
        block = np.asarray(im.crop((0, top, im.width, min(im.height, top + ROWS_PER_BLOCK))), np.int64)
        rgb.paste(Image.fromarray(((np.clip(block, 0, hi) * 255 + hi // 2) // hi).astype(np.uint8), "L"), (0, top))
    return rgb


def float_range(im) -> tuple:
    """(lo, hi) a mode F image is scaled from: [0, 1] widened to take in its finite samples, read
    ROWS_PER_BLOCK rows at a time."""
    lo, hi = 0.0, 1.0
    for top in range(0, im.height, ROWS_PER_BLOCK):
        block = np.asarray(im.crop((0, top, im.width, min(im.height, top + ROWS_PER_BLOCK))), np.float32)
        finite = block[np.isfinite(block)]
        if finite.size:
            lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
    return lo, hi


def float_to_rgb(im):
    """A 32-bit float gray image (mode F, a float TIFF) as RGB gray: each sample v becomes
    floor((clip(v, lo, hi) - lo) * 255 / (hi - lo) + 0.5) in float64, (lo, hi) = ``float_range(im)``; NaN and
    -inf count as lo, +inf as hi. ``convert("RGB")`` clips to 0-255 instead: a [0, 1] picture came out black."""
    lo, hi = float_range(im)
    rgb = Image.new("RGB", im.size)
    for top in range(0, im.height, ROWS_PER_BLOCK):
        block = np.asarray(im.crop((0, top, im.width, min(im.height, top + ROWS_PER_BLOCK))), np.float64)
        block = np.clip(np.nan_to_num(block, nan=lo, posinf=hi, neginf=lo), lo, hi)
        rgb.paste(Image.fromarray(np.floor((block - lo) * 255 / (hi - lo) + 0.5).astype(np.uint8), "L"), (0, top))
    return rgb


def to_rgb(im):
    """Any PIL mode as RGB: 16-bit samples scaled to 8 bits (``gray16_to_rgb``), float samples by their range
    (``float_to_rgb``), transparency (RGBA, LA, PA, a palette with a transparent colour) composited over white,
    anything else by ``convert("RGB")``."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        return gray16_to_rgb(im)
    if im.mode == "F":
        return float_to_rgb(im)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


#: How a photo stored with EXIF Orientation 2-8 is turned upright (Pillow's ``ImageOps.exif_transpose`` table).
UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}


def orientation(im) -> int:
    """The EXIF Orientation (2-8) of an opened image, 1 when it has none, another value, or an EXIF block
    Pillow cannot read: only the tag is read (``exif_transpose`` also rewrites the block, and raises on
    damaged ones), and a damaged block never stops a photo that decodes."""
    try:
        value = im.getexif().get(0x0112, 1)
        return int(value) if value in UPRIGHT else 1
    except Exception:  # Pillow's EXIF parser raises many kinds on damaged data (SyntaxError, struct.error, ...)
        return 1


def upright(rgb, turn: int):
    """``rgb`` turned as EXIF Orientation ``turn`` asks (``orientation``): the photo as a viewer shows it,
    without the EXIF block Pillow copies onto a transposed image, so the turned photo is never turned again."""
    if turn not in UPRIGHT:
        return rgb
    turned = rgb.transpose(UPRIGHT[turn])
    turned.info.pop("exif", None)
    return turned


def jpeg_draft(im, min_short_side) -> int:
    """Ask PIL to decode the opened, not yet loaded JPEG ``im`` at the smallest DCT scale
    (1/2, 1/4, 1/8) whose shorter side is still >= ``min_short_side``; returns the scale (1 = none).

    Only when the shorter side is at least 2 x ``min_short_side`` (below that the scale would be
    1 anyway); never for other formats. PIL's ``draft`` picks the largest scale s in (8, 4, 2, 1)
    with s <= min(W // w, H // h) for the size (w, h) asked, and rounds the result up, so asking for
    a square of ``min_short_side`` keeps ceil(short / s) >= ``min_short_side``.
    An image of more than MAX_PIXELS goes to ``draft_within_limit`` (decoded reduced, or ``TooManyPixels``).
    """
    if im.width * im.height > MAX_PIXELS:
        return draft_within_limit(im, min_short_side)
    if not min_short_side or im.format not in ("JPEG", "MPO") or min(im.size) < 2 * min_short_side:
        return 1
    width = im.width
    drafted = im.draft("RGB", (min_short_side, min_short_side))  # (mode, box of the whole image, scaled)
    return round(width / drafted[1][2]) if drafted else 1


#: Pillow's pixel limit (the default ``Image.MAX_IMAGE_PIXELS``, about 0.25 GB of RGB): no image is decoded to
#: more pixels (a 10000 x 10000 PNG of 120 KB, a decompression bomb, took 0.55 GB).
MAX_PIXELS = 89_478_485
#: A JPEG of more than MAX_PIXELS (phone photos of 108 MP, 12000 x 9000, and 200 MP, 16320 x 12240) is decoded
#: at a reduced DCT scale within MAX_PIXELS, when it declares at most this many pixels: decoding still costs time
#: and memory by the pixels declared (a progressive JPEG of 545 bytes declaring 65000 x 65000 took 31 s and
#: 12.4 GB decoded at 1/8; its coefficients are kept whole).
MAX_JPEG_PIXELS = 3 * MAX_PIXELS


def too_many_pixels(size, jpeg: bool = False) -> str:
    """The one reason given for an image over the limit: its size (w, h), or a pixel count, the limit, what to do
    (``jpeg``: a baseline JPEG, only too large to decode reduced)."""
    what = f"{size[0]} x {size[1]} pixels" if isinstance(size, tuple) else f"{size} pixels"
    return (f"decompression bomb: {what}, more than the {MAX_PIXELS} decoded (a baseline JPEG of up to "
            f"{MAX_JPEG_PIXELS} is decoded reduced); shrink the "
            f"{'photo' if jpeg else 'image or save it as baseline JPEG'}")


def first_bytes(fp, n: int) -> bytes:
    """The first ``n`` bytes of ``fp``: a path, or an open binary file that can seek (left at its start)."""
    if isinstance(fp, (str, bytes, os.PathLike)):
        with open(fp, "rb") as f:
            return f.read(n)
    fp.seek(0)
    head = fp.read(n)
    fp.seek(0)
    return head


def open_within_limit(fp):
    """``Image.open`` (nothing decoded yet) under the pixel limit: a JPEG of more than MAX_PIXELS, up to
    MAX_JPEG_PIXELS, opens too, as a plain JPEG (an MPO's first image), for ``jpeg_draft`` to decode reduced;
    anything else past the limit is ``TooManyPixels``. Pillow's own check only warns up to twice its limit."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return Image.open(fp)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            bomb = e
    if first_bytes(fp, 3) != b"\xff\xd8\xff":
        raise TooManyPixels(too_many_pixels(pillows_count(bomb)))
    return JpegImagePlugin.JpegImageFile(fp)  # what Image.open builds, without its pixel check


def pillows_count(e: Exception):
    """The pixel count in Pillow's DecompressionBomb message (its text when it names none)."""
    words = str(e).split("(", 1)[-1].split(" ", 1)
    return words[0] if words[0].isdigit() else str(e)


def one_scan(im) -> bool:
    """Whether the opened JPEG ``im`` is baseline (or extended) sequential with its first scan holding every
    component: libjpeg then decodes it a row of blocks at a time. Any other (progressive, one component a scan)
    it keeps whole, every coefficient (3 to 6 bytes a pixel declared, whatever the scale: a progressive JPEG of
    545 bytes declaring 65000 x 65000 took 31 s and 12.4 GB at 1/8). Reads the markers up to the first scan."""
    fp, where, sof = im.fp, im.fp.tell(), None
    try:
        fp.seek(im.tile[0][2] if im.tile else 0)
        if fp.read(2) != b"\xff\xd8":
            return False
        while fp.read(1) == b"\xff":
            marker = fp.read(1)
            while marker == b"\xff":
                marker = fp.read(1)
            if not marker:
                return False
            if marker[0] == 0x01 or 0xD0 <= marker[0] <= 0xD7:  # markers without a segment
                continue
            segment = fp.read(int.from_bytes(fp.read(2), "big") - 2)
            if 0xC0 <= marker[0] <= 0xCF and marker[0] not in (0xC4, 0xC8, 0xCC):
                sof = (marker[0], segment[5:6])  # the frame's kind, its component count
            elif marker[0] == 0xDA:
                return sof is not None and sof[0] in (0xC0, 0xC1) and segment[:1] == sof[1]
        return False
    finally:
        fp.seek(where)


def draft_within_limit(im, min_short_side) -> int:
    """A baseline JPEG of more than MAX_PIXELS, up to MAX_JPEG_PIXELS, asked to decode at ``jpeg_draft``'s scale or
    the smallest larger one (2, 4, 8) within MAX_PIXELS; returns the scale. ``TooManyPixels`` for any other image."""
    w, h = im.size
    jpeg = im.format in ("JPEG", "MPO") and one_scan(im)
    if not jpeg or w * h > MAX_JPEG_PIXELS:
        raise TooManyPixels(too_many_pixels(im.size, jpeg))
    scale = 1
    if min_short_side and min(w, h) >= 2 * min_short_side:
        scale = next(s for s in (8, 4, 2, 1) if s <= min(w // min_short_side, h // min_short_side))
    while -(-w // scale) * -(-h // scale) > MAX_PIXELS:  # MAX_JPEG_PIXELS is under 4 x MAX_PIXELS: 1/2 will do
        scale *= 2
    if not im.draft("RGB", (w // scale, h // scale)) or im.width * im.height > MAX_PIXELS:
        raise TooManyPixels(too_many_pixels((w, h), jpeg=True))  # a JPEG Pillow cannot decode reduced
    return scale


def resize_crop(im, p: dict):
    """torchvision's Resize([resize_size]) then CenterCrop(crop_size) on a PIL image; ``p``: the metadata's
    "preprocessing"."""
    w, h = im.size
    short, long = (w, h) if w <= h else (h, w)
    size = (p["resize_size"], int(p["resize_size"] * long / short))
    im = im.resize(size if w <= h else size[::-1], RESAMPLE[p["interpolation"]])
    w, h, c = im.width, im.height, p["crop_size"]
    left, top = round((w - c) / 2.0), round((h - c) / 2.0)  # Python rounds half to even, as torchvision
    return im.crop((left, top, left + c, top + c))


def normalise(im, p: dict) -> np.ndarray:
    """A (3, crop, crop) float32 array: /255, minus mean, divided by std, as torchvision does in float32."""
    x = np.asarray(im, np.float32) / np.float32(255)
    x = (x - np.array(p["mean"], np.float32)) / np.array(p["std"], np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))  # HWC -> CHW


#: Formats Pillow decodes by running another program on the bytes (EPS: Ghostscript, a PostScript interpreter,
#: unbounded in time: ``{} loop``): refused, whatever the file is named.
EXTERNAL_FORMATS = {"EPS": "Ghostscript"}


def refuse_external(im) -> None:
    """``Refused`` (a ValueError) for an opened image of EXTERNAL_FORMATS, before any of it is decoded."""
    if im.format in EXTERNAL_FORMATS:
        raise Refused(f"{im.format} is not decoded: it would run {EXTERNAL_FORMATS[im.format]} on the file "
                      "(convert it to PNG or JPEG)")


def as_pillow_reads(fp):
    """``fp`` as Image.open reads it: a path as it is, an open binary file from its start (Pillow seeks to 0: a
    BytesIO just written to is read whole), one that cannot seek (a pipe, a request's stream) read into memory
    first, as Pillow does itself. refuse_empty read such a stream's position, and refused the first as empty."""
    if isinstance(fp, (str, bytes, os.PathLike)):
        return fp
    try:
        fp.seek(0)
        return fp
    except (AttributeError, io.UnsupportedOperation):
        return io.BytesIO(fp.read())


#: What a path that is not a regular file is, in predict's words (``data.folders`` says the same).
NOT_REGULAR = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def not_regular(mode: int):
    """What a file of ``mode`` (``os.stat``'s st_mode) is when it is not a regular file, else None."""
    if stat.S_ISREG(mode):
        return None
    return next((what for test, what in NOT_REGULAR if test(mode)), "not a regular file")


def refuse_empty(fp) -> None:
    """``Refused`` for a file of no bytes (a path, or an open binary file that can seek: ``as_pillow_reads``), in
    predict's words: Pillow calls it an image of unidentified format, the example said 'not an image' where
    predict said 'zero-byte file'. A path that is not a regular file is refused as what it is, never opened (a
    named pipe would block Image.open forever; its size, 0, made it a 'zero-byte file')."""
    if isinstance(fp, (str, bytes, os.PathLike)):
        st = os.stat(fp)
        what = not_regular(st.st_mode)
        if what:
            raise Refused(f"not a regular file ({what})")
        empty = st.st_size == 0
    else:
        fp.seek(0)
        empty = not fp.read(1)
        fp.seek(0)
    if empty:
        raise Refused("zero-byte file")


class Refused(ValueError):
    """A file this rule will not decode (``refuse_external``, ``refuse_empty``, ``refuse_thin``): its message is the
    whole reason."""


class TooManyPixels(Refused):
    """An image of more pixels than this rule decodes (``too_many_pixels`` is its message)."""


#: Longest side over shortest side decoded. The resize sets the shorter side to ``resize_size``, so what it
#: builds grows with this ratio, not with the file: a 1 x 20000 PNG of 161 bytes became a 256 x 5,120,000
#: image (the example took 5.2 GB and 14 s on it). At 100 the resize stays under 7 M pixels.
MAX_ASPECT_RATIO = 100


def refuse_thin(size) -> None:
    """``Refused`` for an image of ``size`` (from its header) too thin to resize safely, before it is decoded."""
    w, h = size
    if max(w, h) > MAX_ASPECT_RATIO * max(1, min(w, h)):
        raise Refused(f"{w} x {h} pixels: more than {MAX_ASPECT_RATIO} times longer than wide, its resize would "
                      "build a huge image")


#: The ISO base media brands of HEIF images (an iPhone's HEIC photos): ``ftyp`` then one of these at byte 8.
HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1")


def unidentified(fp) -> str:
    """Why Pillow identified no format in ``fp`` (a path, or an open binary file that can seek), in predict's words:
    a photo of a format Pillow does not decode, told by its first bytes (an iPhone's HEIC photo named .jpg, a JPEG
    XL, a TIFF of a sample layout Pillow does not read: each was 'not an image'), else 'not an image'."""
    try:
        head = first_bytes(fp, 16)
    except OSError:
        head = b""
    if head[4:8] == b"ftyp" and head[8:12] in HEIF_BRANDS:
        return ("a HEIC photo, which is not decoded: convert it to JPEG first (heif-convert IN OUT.jpg, or on a Mac "
                "sips -s format jpeg IN --out OUT.jpg)")
    if head[:2] == b"\xff\x0a" or head[:12] == b"\0\0\0\x0cJXL \r\n\x87\n":
        return "a JPEG XL image, which is not decoded: convert it to JPEG or PNG first (djxl IN OUT.png)"
    if head[:4] in (b"II*\0", b"MM\0*"):
        return ("a TIFF that is not decoded: damaged, or of a kind Pillow does not read (16-bit gray with alpha, "
                "float RGB, ...; save it as an 8-bit PNG or TIFF)")
    return "not an image (unidentified format)"


def cut_short(fp) -> str:
    """The reason of an image file that ends early (an interrupted copy or download), told by how its format ends: a
    JPEG without its end marker, a PNG without its IEND chunk, a GIF without its trailer, a WebP shorter than its
    header says; '' for any other (a path, or an open binary file that can seek). Asked only of a file that did
    not decode: a JPEG cut in its header was 'not an image', a WebP cut short 'could not create decoder object'."""
    try:
        f = open(fp, "rb") if isinstance(fp, (str, bytes, os.PathLike)) else fp
        try:
            f.seek(0)
            head = f.read(16)
            size = f.seek(0, 2)
            f.seek(max(0, size - 16))
            tail = f.read()
            f.seek(0)
        finally:
            if f is not fp:
                f.close()
    except (OSError, ValueError):  # gone, or closed
        return ""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP" and int.from_bytes(head[4:8], "little") + 8 > size:
        return (f"unreadable image: a WebP cut short ({size} of the {int.from_bytes(head[4:8], 'little') + 8} bytes "
                "its header declares)")
    ends = ((b"\xff\xd8\xff", "JPEG", "its end marker", tail.rstrip(b"\0").endswith(b"\xff\xd9")),
            (b"\x89PNG\r\n\x1a\n", "PNG", "its IEND chunk", b"IEND" in tail),
            (b"GIF8", "GIF", "its trailer", tail.endswith(b";")))
    for magic, name, end, ended in ends:
        if head.startswith(magic) and not ended:
            return f"unreadable image: a {name} cut short (it ends before {end}: an interrupted copy or download?)"
    return ""


def failure_reason(e: Exception, fp) -> str:
    """Why the photo in ``fp`` (a path, or an open binary file that can seek) did not decode, Pillow having raised
    ``e``: ``decode_failure(e)``, or the file's format when Pillow identified none (``unidentified``), or a file cut
    short (``cut_short``) where Pillow's words do not say so already."""
    if not isinstance(e, (Refused, Image.DecompressionBombError, Image.DecompressionBombWarning)) \
            and "truncated" not in str(e).lower():
        short = cut_short(fp)
        if short:
            return short
    return unidentified(fp) if isinstance(e, Image.UnidentifiedImageError) else decode_failure(e)


def decode_failure(e: Exception) -> str:
    """Why a photo did not decode, in predict's words (``data.folders.decode_stream`` gives these): the
    example said Pillow's 'UnidentifiedImageError: cannot identify image file ...' where predict said 'not an
    image (unidentified format)'."""
    if isinstance(e, Refused):
        return str(e)
    if isinstance(e, Image.UnidentifiedImageError):
        return "not an image (unidentified format)"
    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return too_many_pixels(pillows_count(e))
    return f"unreadable image: {e}"


def preprocess(fp, p, decoding: dict) -> np.ndarray:
    """The network's input for one photo (a path or an open binary file), by the rule above; ``p``: the
    metadata's "preprocessing", ``decoding``: its "decoding". A fused model's "preprocessing" is a list, one a
    backbone: the photo decoded once, part i in channels 3i..3i+2 at the top left of a zero canvas."""
    fp = as_pillow_reads(fp)
    refuse_empty(fp)
    try:
        im = open_within_limit(fp)  # past Pillow's pixel limit it only warns and decodes: refused, as predict does
        with im:
            refuse_external(im)
            refuse_thin(im.size)
            jpeg_draft(im, decoding.get("jpeg_draft_min_short_side"))
            im.load()
            rgb = upright(to_rgb(im), orientation(im))
    except (OSError, SyntaxError, ValueError, NotImplementedError, RuntimeError, TypeError) as e:
        if isinstance(e, Refused):
            raise
        raise Refused(failure_reason(e, fp)) from None
    if isinstance(p, dict):
        return normalise(resize_crop(rgb, p), p)
    side = max(part["crop_size"] for part in p)
    out = np.zeros((3 * len(p), side, side), np.float32)
    for i, part in enumerate(p):
        x = normalise(resize_crop(rgb, part), part)
        out[3 * i:3 * i + 3, :x.shape[1], :x.shape[2]] = x
    return out
