import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, features

from pipeline.cli import cli
from pipeline.data.folders import ImageLoadError, jpeg_bytes, list_image_folder, load_rgb, stratified_order
from tests.conftest import make_image_folder
from tests.fsfaults import make_non_regular, no_hang, unlistable


def test_listing_sorted_classes_and_skips_non_images(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=3)
    (root / "red" / "Thumbs.db").write_bytes(b"x")
    (root / "red" / ".hidden.jpg").write_bytes(b"x")
    listing = list_image_folder(root)
    assert listing.classes == ("blue", "red")
    assert len(listing.files) == 6
    assert all(f.path.endswith(".jpg") and not f.path.startswith(".") for f in listing.files)
    assert listing.labels.tolist() == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("name, fmt, mode", [("a.jfif", "JPEG", "RGB"), ("b.PPM", "PPM", "RGB"), ("c.pgm", "PPM", "L")])
def test_jfif_ppm_and_pgm_photos_are_listed_and_checked_clean(tmp_path, name, fmt, mode):
    """PIL reads them (torchvision's ImageFolder lists .ppm/.pgm; Windows browsers save JPEGs as .jfif),
    but the listing left them out: check-images called them 'unlisted-image' and extract never saw them."""
    from pipeline.data.check_images import check_file

    root = make_image_folder(tmp_path / "d", per_class=1)
    Image.new(mode, (40, 30), 128).save(root / "red" / name, format=fmt)
    assert f"red/{name}" in [f.path for f in list_image_folder(root).files]
    assert [f["kind"] for f in check_file(str(root), f"red/{name}")] == ([] if mode == "RGB" else ["non-rgb-mode"])


def test_fingerprint_changes_when_a_file_changes(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=3)
    before = list_image_folder(root).fingerprint()
    assert list_image_folder(root).fingerprint() == before
    (root / "red" / "red.0.jpg").write_bytes((root / "blue" / "blue.0.jpg").read_bytes())
    assert list_image_folder(root).fingerprint() != before


@pytest.mark.parametrize("setup, message", [
    (lambda r: None, "does not exist"),
    (lambda r: r.mkdir(), "holds no images"),
    (lambda r: make_image_folder(r, classes=("red",)), "need at least two"),
])
def test_listing_errors(tmp_path, setup, message):
    root = tmp_path / "d"
    setup(root)
    with pytest.raises(ValueError, match=message):
        list_image_folder(root)


def test_stratified_order_prefixes_are_balanced_and_seeded():
    labels = np.array([0] * 300 + [1] * 100)
    order = stratified_order(labels, seed=3)
    assert sorted(order.tolist()) == list(range(400))
    for n in (4, 40, 200):
        counts = np.bincount(labels[order[:n]], minlength=2)
        assert abs(counts[0] - 0.75 * n) <= 1, (n, counts)
    assert (stratified_order(labels, 3) == order).all()
    assert not (stratified_order(labels, 4) == order).all()


def test_load_rgb_converts_modes_and_names_bad_files(tmp_path):
    Image.new("L", (10, 10), 128).save(tmp_path / "g.png")
    Image.new("RGBA", (10, 10), (255, 0, 0, 0)).save(tmp_path / "a.png")
    assert load_rgb(tmp_path / "g.png").mode == "RGB"
    assert load_rgb(tmp_path / "a.png").getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    (tmp_path / "z.jpg").write_bytes(b"")
    (tmp_path / "t.jpg").write_text("hello")
    with pytest.raises(ImageLoadError, match="zero-byte"):
        load_rgb(tmp_path / "z.jpg")
    with pytest.raises(ImageLoadError, match="not an image"):
        load_rgb(tmp_path / "t.jpg")


def test_links_and_pipes_are_listed_as_bad_never_opened(tmp_path, caplog):
    root = make_image_folder(tmp_path / "d", per_class=2)
    reasons = make_non_regular(root / "red")
    with no_hang(30):
        listing = list_image_folder(root)
    assert [f.path for f in listing.files] == ["blue/blue.0.jpg", "blue/blue.1.jpg", "red/red.0.jpg", "red/red.1.jpg"]
    bad = dict(listing.bad)
    assert set(bad) == {f"red/{n}" for n in reasons}
    for name, why in reasons.items():
        assert why in bad[f"red/{name}"]
        with no_hang(30), pytest.raises(ImageLoadError, match=why) as e:
            load_rgb(root / "red" / name)
        assert e.value.kind == "not-a-file"
        with no_hang(30), pytest.raises(ImageLoadError, match=why):
            jpeg_bytes(root / "red" / name)
    assert "3 entries" in caplog.text and "not regular files" in caplog.text


def test_a_link_to_a_regular_image_is_listed(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=1)
    (root / "red" / "again.jpg").symlink_to("red.0.jpg")
    listing = list_image_folder(root)
    assert "red/again.jpg" in {f.path for f in listing.files} and listing.bad == ()
    assert load_rgb(root / "red" / "again.jpg").mode == "RGB"


def test_metadata_folders_are_neither_classes_nor_images(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=1)
    for junk in ("__MACOSX", "red/__MACOSX", "red/@eaDir"):
        (root / junk).mkdir()
        (root / junk / "thumb.jpg").write_bytes((root / "red" / "red.0.jpg").read_bytes())
    listing = list_image_folder(root)
    assert listing.classes == ("blue", "red")
    assert [f.path for f in listing.files] == ["blue/blue.0.jpg", "red/red.0.jpg"]


def test_links_to_sub_folders_are_followed_and_a_loop_is_left_out_and_told(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=1)
    more = make_image_folder(tmp_path / "more", classes=("blue",), per_class=2) / "blue"
    (root / "red" / "more").symlink_to(more, target_is_directory=True)
    (root / "red" / "up").symlink_to("..", target_is_directory=True)  # a loop back into the data folder
    listing = list_image_folder(root)
    assert {f.path for f in listing.files} >= {"red/more/blue.0.jpg", "red/more/blue.1.jpg"}
    assert [(p, "folder listed already" in why) for p, why in listing.bad] == [("red/up", True)]


@pytest.mark.parametrize("content", [None, "Thumbs.db", "link"])
def test_a_class_folder_without_images_is_refused(tmp_path, content):
    root = make_image_folder(tmp_path / "d", classes=("blue", "red", "green"), per_class=1)
    for f in (root / "green").iterdir():
        f.unlink()
    if content == "Thumbs.db":
        (root / "green" / "Thumbs.db").write_bytes(b"x")
    elif content == "link":
        (root / "green" / "x.jpg").symlink_to("/nonexistent")
    with pytest.raises(ValueError, match=r"class folder '.*green' holds no images; remove it or add images"):
        list_image_folder(root)


def test_a_class_folder_of_files_of_other_types_says_what_it_holds(tmp_path):
    """An iPhone's folder of .HEIC photos was refused as 'holds no images; remove it or add images', though it held
    them: the refusal now names what it holds, the types read, and (HEIC) how to convert them."""
    root = make_image_folder(tmp_path / "d", per_class=1)
    for f in (root / "red").iterdir():
        f.unlink()
    for i in range(3):
        (root / "red" / f"IMG_000{i}.HEIC").write_bytes(b"\0\0\0\x18ftypheic" + bytes(100))
    (root / "red" / "Thumbs.db").write_bytes(b"x")
    r = CliRunner().invoke(cli, ["check-images", str(root)])  # check-images' listing is unchanged
    assert r.exit_code == 0 and "extract refuses" in r.stdout, r.output
    with pytest.raises(ValueError, match=r"^class folder '.*red' holds no images; remove it or add images \(its 3 "
                                         r"files, e\.g\. 'IMG_0000\.HEIC', are not of the types read: \.jpg \.jpeg "
                                         r".*; HEIC photos, as iPhones take them, convert to JPEG first: heif-convert"):
        list_image_folder(root)
    for f in (root / "red").glob("*.HEIC"):
        f.unlink()
    (root / "red" / "notes.txt").write_text("May")
    with pytest.raises(ValueError, match=r"holds no images; remove it or add images \(its one file, 'notes\.txt', "
                                         r"is not of the types read: [^;]*\)$"):
        list_image_folder(root)


def test_images_loose_beside_the_class_folders_are_said_to_be_left_out(tmp_path, caplog):
    """Photos dropped into the data folder itself, beside its class folders, belong to no class: every command left
    them out without a word (check-images counted them as good files). Said once per listing, naming one."""
    root = make_image_folder(tmp_path / "d", per_class=2)
    for name in ("unsorted1.jpg", "unsorted0.png"):
        (root / name).write_bytes((root / "blue" / "blue.0.jpg").read_bytes())
    (root / "readme.txt").write_text("not an image")
    with caplog.at_level("WARNING"):
        listing = list_image_folder(root)
    assert len(listing.files) == 4
    assert [r.getMessage() for r in caplog.records] == [
        f"2 images lie in {root} itself, in no class folder, and are left out (e.g. unsorted0.png); move them into "
        "their class folders to use them"]


def test_class_folders_that_differ_only_in_case_or_spaces_are_said(tmp_path, caplog):
    """'Cat' and 'cat' (two cameras' imports), 'Dog' and 'Dog ' (a space typed): four classes, each with half of the
    photos of the two meant, taken without a word (on macOS or Windows they would be one folder each)."""
    root = make_image_folder(tmp_path / "d", per_class=1, classes=("blue", "red"))
    (root / "blue").rename(root / "Blue")
    make_image_folder(tmp_path / "d", per_class=1, classes=("blue", "red"))
    (root / "red").rename(root / "red ")
    make_image_folder(tmp_path / "d", per_class=1, classes=("red",))
    with caplog.at_level("WARNING"):
        assert list_image_folder(root).classes == ("Blue", "blue", "red", "red ")
    assert [r.getMessage() for r in caplog.records] == [
        f"class folders of {root} that differ only in case or spaces are taken as different classes: 'Blue' and "
        "'blue'; 'red' and 'red ' (move the photos into one folder if they are one class)"]
    caplog.clear()
    list_image_folder(make_image_folder(tmp_path / "other", per_class=1))
    assert caplog.records == []


def test_class_folders_that_are_one_name_in_two_unicode_forms_are_said(tmp_path, caplog):
    """'café' written as one letter é (NFC, as typed on Linux) and as e + a combining accent (NFD, as a Mac names
    folders): two classes that look like one wherever they are shown, taken without a word; now said, the two
    names written as ascii() writes them so that they can be told apart."""
    root = make_image_folder(tmp_path / "d", per_class=1, classes=("blue", "red"))
    (root / "blue").rename(root / "caf\u00e9")
    (root / "red").rename(root / "cafe\u0301")
    with caplog.at_level("WARNING"):
        assert len(list_image_folder(root).classes) == 2
    assert [r.getMessage() for r in caplog.records] == [
        f"class folders of {root} that are the same name in other Unicode code points (NFC and NFD: a folder made on "
        "a Mac) are taken as different classes: 'cafe\\u0301' and 'caf\\xe9' (move the photos into one folder if "
        "they are one class)"]


def test_sixteen_bit_images_scale_by_their_bit_depth_never_by_their_content(tmp_path):
    dark = np.full((8, 8), 200, np.uint16)  # a dark 16-bit picture: every pixel <= 255
    bright = dark.copy()
    bright[0, 0] = 60000  # one bright pixel must not change how the others are scaled
    Image.fromarray(dark).save(tmp_path / "dark.png")
    Image.fromarray(bright).save(tmp_path / "bright.png")
    assert np.asarray(load_rgb(tmp_path / "dark.png"))[4, 4].tolist() == [1, 1, 1]  # 200 / 65535 * 255
    assert np.asarray(load_rgb(tmp_path / "bright.png"))[4, 4].tolist() == [1, 1, 1]


def test_an_extremely_thin_image_is_refused_from_its_header(tmp_path):
    Image.new("RGB", (12000, 1)).save(tmp_path / "thin.png")
    Image.new("RGB", (100, 1)).save(tmp_path / "ok.png")
    with pytest.raises(ImageLoadError, match="more than 100 times") as e:
        load_rgb(tmp_path / "thin.png")
    assert e.value.kind == "extreme-aspect" and load_rgb(tmp_path / "ok.png").size == (100, 1)


def test_a_name_that_is_not_utf8_is_left_out_and_reported_escaped(tmp_path):
    import os

    root = make_image_folder(tmp_path / "d", per_class=3)
    latin1 = os.fsdecode(b"caf\xe9.jpg")
    (root / "red" / "red.0.jpg").rename(root / "red" / latin1)
    listing = list_image_folder(root)
    assert len(listing.files) == 5 and listing.bad == (("red/caf\\xe9.jpg", listing.bad[0][1]),)
    assert "not valid UTF-8" in listing.bad[0][1]


def test_refusals_name_a_folder_or_file_that_is_not_utf8_with_one_backslash(tmp_path):
    """A class folder, or the one file of an empty class, named in latin-1 was quoted 'caf\\\\xe9' (repr of the
    escaped name): a name no folder has. Now 'caf\\xe9', as every list and report writes it."""
    import os

    root = make_image_folder(tmp_path / "d", per_class=3)
    os.rename(root / "red", os.path.join(os.fsencode(root), b"caf\xe9"))
    with pytest.raises(ValueError) as e:
        list_image_folder(root)
    assert str(e.value).startswith("class folder 'caf\\xe9': the file name is not valid UTF-8"), e.value
    os.rename(os.path.join(os.fsencode(root), b"caf\xe9"), root / "red")
    for f in (root / "red").iterdir():
        f.unlink()
    (root / "red" / os.fsdecode(b"notes\xe9.txt")).write_text("May")
    with pytest.raises(ValueError) as e:
        list_image_folder(root)
    assert "(its one file, 'notes\\xe9.txt', is not of the types read" in str(e.value), e.value


def test_reasons_that_may_pass_are_told_from_verdicts_on_a_files_bytes(tmp_path):
    from pipeline.data.folders import is_os_error_reason, regular_file_stat

    with pytest.raises(ImageLoadError) as gone:
        regular_file_stat(tmp_path / "gone.jpg")
    assert is_os_error_reason(gone.value.reason)  # "unreadable image: No such file or directory"
    assert is_os_error_reason("unreadable image: [Errno 5] Input/output error")
    for verdict in ("unreadable image: image file is truncated", "zero-byte file", "not an image (unidentified format)",
                    "a dangling symlink (to 'x')"):
        assert not is_os_error_reason(verdict)


def test_a_listing_tells_which_files_changed_since(tmp_path):
    import os

    data = make_image_folder(tmp_path / "d", per_class=3)
    listing = list_image_folder(data)
    paths = [f.path for f in listing.files]
    assert listing.changed(paths) == []
    (data / paths[0]).unlink()
    st = (data / paths[1]).stat()
    os.utime(data / paths[1], ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert listing.changed(paths + ["blue/not-listed.jpg"]) == paths[:2]


def test_pil_warnings_on_a_damaged_exif_block_are_dropped_unless_asked_for(tmp_path):
    """An EXIF block cut short decodes fine but made PIL warn "Truncated File Read", a line naming no file, from
    every decoder outside the image reader (evaluate's gallery, audit's report, export's parity check, serve)."""
    import warnings

    from pipeline.data.folders import decode_bytes, decode_image, thumbnail
    from tests.badfiles import _corrupt_exif_jpeg

    photo = tmp_path / "exif.jpg"
    photo.write_bytes(_corrupt_exif_jpeg())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert thumbnail(photo, 16).size[0] <= 16 and load_rgb(photo).size == (40, 32)
        decode_bytes(photo.read_bytes())
    assert [str(w.message) for w in caught] == []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decode_image(photo, pil_warnings=True)  # check-images reports them
    assert any("Truncated File Read" in str(w.message) for w in caught)


def test_postscript_is_never_handed_to_ghostscript_even_named_jpg(tmp_path, monkeypatch):
    """Pillow decodes EPS by running Ghostscript (a PostScript interpreter: `{} loop` never ends) on the
    bytes: an upload to serve, or a photo folder's file, must not get to run it."""
    import PIL.EpsImagePlugin

    from pipeline.data.folders import decode_bytes

    ran = []
    monkeypatch.setattr(PIL.EpsImagePlugin, "Ghostscript", lambda *a, **k: ran.append(a) or Image.new("RGB", (8, 8)).im)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n{} loop\n"
    (tmp_path / "photo.jpg").write_bytes(eps)
    for decode in (lambda: decode_bytes(eps), lambda: load_rgb(tmp_path / "photo.jpg")):
        with pytest.raises(ImageLoadError, match="EPS is not decoded: .*Ghostscript"):
            decode()
    assert not ran


def test_a_file_pillow_cannot_decode_by_any_of_its_errors_is_an_unreadable_image_not_a_crash(tmp_path):
    """A DDS header with no pixel format (504 bytes named .jpg) made Pillow raise NotImplementedError, which
    ended predict and extract of a whole folder on it ("unexpected NotImplementedError")."""
    import io

    from pipeline.data.folders import decode_bytes

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "DDS")
    dds = bytearray(buf.getvalue())
    dds[80:84] = bytes(4)  # the pixel format's flags: none
    (tmp_path / "photo.jpg").write_bytes(dds)
    for decode in (lambda: decode_bytes(bytes(dds)), lambda: load_rgb(tmp_path / "photo.jpg")):
        with pytest.raises(ImageLoadError, match="unreadable image: Unknown pixel format"):
            decode()


@pytest.mark.skipif(not features.check("avif"), reason="this Pillow decodes no AVIF")
def test_a_damaged_avif_is_an_unreadable_image_not_a_crash(tmp_path):
    """An AVIF whose primary item is missing (named .jpg) made Pillow raise RuntimeError, which ended check-images,
    extract and predict of a whole folder on it and was a 500 in serve."""
    import io

    from pipeline.data.folders import decode_bytes

    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, "AVIF")
    avif = bytearray(buf.getvalue())
    at = avif.find(b"pitm") + 8  # after the box's type and its version and flags: the primary item's id
    avif[at:at + 2] = b"\x00\x63"  # an item the file does not hold
    (tmp_path / "photo.jpg").write_bytes(avif)
    for decode in (lambda: decode_bytes(bytes(avif)), lambda: load_rgb(tmp_path / "photo.jpg")):
        with pytest.raises(ImageLoadError, match="unreadable image: .*image item"):
            decode()


def test_a_damaged_header_pillow_trips_over_while_opening_is_an_unreadable_image(tmp_path):
    """A SPIDER header naming an image of a stack with no stack made Image.open itself raise AttributeError (a
    Pillow bug), which ended predict and extract of a whole folder on it."""
    import io
    import struct

    from pipeline.data.folders import decode_bytes

    buf = io.BytesIO()
    Image.new("F", (8, 8)).save(buf, "SPIDER")
    spider = bytearray(buf.getvalue())
    spider[104:108] = struct.pack("<f", 1.0)  # the header's image number: 1, in no stack
    (tmp_path / "photo.jpg").write_bytes(spider)
    for decode in (lambda: decode_bytes(bytes(spider)), lambda: load_rgb(tmp_path / "photo.jpg")):
        with pytest.raises(ImageLoadError, match="unreadable image: .*stkoffset"):
            decode()


def test_a_class_folder_linking_to_another_class_or_the_root_is_left_out_and_told(tmp_path):
    """`Cat2 -> Cat` was listed as a third class of the same photos (each image under two labels), and a link
    to the data folder itself made a class of its loose files."""
    root = make_image_folder(tmp_path / "d", per_class=2)
    (root / "a_blue_again").symlink_to("blue", target_is_directory=True)  # sorts before the folder it links to
    (root / "all").symlink_to(".", target_is_directory=True)
    (root / "loose.jpg").write_bytes((root / "red" / "red.0.jpg").read_bytes())
    listing = list_image_folder(root)
    assert listing.classes == ("blue", "red")
    assert sorted(f.path for f in listing.files) == ["blue/blue.0.jpg", "blue/blue.1.jpg", "red/red.0.jpg",
                                                    "red/red.1.jpg"]
    assert sorted((p, "folder listed already" in why) for p, why in listing.bad) == [("a_blue_again", True),
                                                                                    ("all", True)]


def test_a_looping_link_beside_the_class_folders_is_no_class_and_no_crash(tmp_path):
    """A link loop in the data folder itself (or a class folder given as the data folder) made listing it raise
    'Too many levels of symbolic links': extract, evaluate, audit and check-images ended in 'a bug?'."""
    root = make_image_folder(tmp_path / "d", per_class=1)
    (root / "x").symlink_to("y")
    (root / "y").symlink_to("x")
    (root / "gone").symlink_to("nowhere")
    listing = list_image_folder(root)
    assert listing.classes == ("blue", "red")
    assert [f.path for f in listing.files] == ["blue/blue.0.jpg", "red/red.0.jpg"]


def test_a_folder_the_os_will_not_list_is_left_out_and_told(tmp_path, monkeypatch):
    """os.walk passed over a folder it could not list (a chmod 000 sub-folder of another user's): its photos were
    missing from extract, check-images and predict without a word. A class folder so refused was 'holds no images;
    remove it or add images' (exit 2), of a folder full of photos."""
    from pipeline.errors import PipelineError

    root = make_image_folder(tmp_path / "d", per_class=1)
    (root / "red" / "sub").mkdir()
    (root / "red" / "sub" / "more.jpg").write_bytes((root / "red" / "red.0.jpg").read_bytes())
    unlistable(monkeypatch, root / "red" / "sub")
    listing = list_image_folder(root)
    assert [f.path for f in listing.files] == ["blue/blue.0.jpg", "red/red.0.jpg"]
    assert listing.bad == (("red/sub", "cannot be read (Permission denied): its files are left out"),)
    unlistable(monkeypatch, root / "red")
    with pytest.raises(PipelineError, match=r"class folder '.*red' cannot be read \(Permission denied\): its files "
                                            "are left out; fix its permissions"):
        list_image_folder(root)


def test_a_data_folder_the_os_will_not_list_is_one_line_of_the_environment(tmp_path, monkeypatch):
    """The data folder itself unlistable (chmod 000 of another user's) ended extract, audit and check-images in
    'unexpected PermissionError ... (a bug?)'."""
    root = make_image_folder(tmp_path / "d", per_class=1)
    unlistable(monkeypatch, root)
    run = CliRunner().invoke(cli, ["check-images", str(root)])
    assert run.exit_code == 1, run.output
    assert f"data folder {str(root)!r} cannot be read (Permission denied); fix its permissions" in run.output
    assert "a bug?" not in run.output


def test_the_left_out_warning_names_each_entry_up_to_five_and_counts_the_rest(tmp_path, caplog):
    """It named the first entry alone ('4 entries ... left out; first: X'): a messy folder's other broken links and
    non-UTF-8 names went unnamed by extract, evaluate and audit's own listing."""
    import logging

    root = make_image_folder(tmp_path / "d", per_class=1)
    for i in range(3):
        (root / "red" / f"gone{i}.jpg").symlink_to("nowhere")
    with caplog.at_level(logging.WARNING):
        list_image_folder(root)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and all(f"red/gone{i}.jpg: a dangling symlink (to 'nowhere')" in said[0] for i in range(3))
    for i in range(3, 7):
        (root / "red" / f"gone{i}.jpg").symlink_to("nowhere")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        list_image_folder(root)
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith(f"7 entries of {root} left out") and "red/gone4.jpg" in line and "gone5" not in line
    assert line.endswith(f"; and 2 more (check-images {root} names every one)")


def test_a_pools_left_out_folders_are_named_from_the_pool_as_its_files_are(tmp_path, monkeypatch):
    """list_unlabelled walks the pool itself, and walk names what it leaves out from the pool's parent: the warning
    and the pool cache's skipped files said 'pool/sub/again' of pool/sub/again, beside files named 'a/x.jpg'."""
    from pipeline.data.folders import list_unlabelled

    pool = make_image_folder(tmp_path / "pool", per_class=1)
    (pool / "red" / "again").symlink_to("../blue", target_is_directory=True)
    (pool / "locked").mkdir()
    unlistable(monkeypatch, pool / "locked")
    listing = list_unlabelled(pool)
    assert [f.path for f in listing.files] == ["blue/blue.0.jpg", "red/red.0.jpg"]
    assert sorted(p for p, _ in listing.bad) == ["locked", "red/again"]


def test_a_folder_of_loose_photos_is_not_said_to_hold_no_images(tmp_path):
    """suggest's pool (or any folder of loose photos) given as --data / --test-data was 'holds no images': it
    holds them, only not in class sub-folders."""
    root = make_image_folder(tmp_path / "d", per_class=3)
    for p in list(root.rglob("*.jpg")):
        p.rename(root / p.name)
    for c in ("blue", "red"):
        (root / c).rmdir()
    with pytest.raises(ValueError, match="has no class sub-folders: its 6 images lie loose in it"):
        list_image_folder(root)


def declared_jpeg(width: int, height: int, progressive: bool = False, scan_of_one: bool = False) -> bytes:
    """A 64 x 64 JPEG whose frame header (SOF) claims width x height: a few hundred bytes, a hostile file.
    ``scan_of_one``: its first scan names one component of three (libjpeg then buffers the whole image)."""
    import io
    import struct

    out = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(out, "JPEG", progressive=progressive, subsampling=0)
    data, i = out.getvalue(), 2
    while data[i + 1] not in (0xC0, 0xC2):  # walk the markers to the frame header
        i += 2 + struct.unpack(">H", data[i + 2:i + 4])[0]
    data = data[:i + 5] + struct.pack(">HH", height, width) + data[i + 9:]
    while scan_of_one and data[i + 1] != 0xDA:  # on to the first scan's header
        i += 2 + struct.unpack(">H", data[i + 2:i + 4])[0]
    if scan_of_one:
        length, components = struct.unpack(">HB", data[i + 2:i + 5])
        header = bytes([1]) + data[i + 5:i + 7] + data[i + 5 + 2 * components:i + 2 + length]
        data = data[:i + 2] + struct.pack(">H", 2 + len(header)) + header + data[i + 2 + length:]
    return data


def test_a_108_mp_phone_photo_decodes_reduced_within_the_pixel_limit_by_every_path(tmp_path):
    """A 12000 x 9000 JPEG (a 108 MP phone photo; 89,478,485 is the limit) was refused everywhere as a
    decompression bomb: it decodes at the DCT scale the weights' resize allows (1/8 for a shorter side of 512),
    or without one at the smallest scale within the limit (1/2), identically through a file, bytes and the
    export's rule."""
    import io

    from pipeline.data import portable
    from pipeline.data.folders import decode_bytes, decode_image, jpeg_bytes

    photo = tmp_path / "phone.jpg"
    Image.new("RGB", (12000, 9000), (10, 120, 200)).save(photo, quality=90)  # 1.7 MB
    assert load_rgb(photo, 512).size == (1500, 1125) and decode_bytes(photo.read_bytes(), 512).size == (1500, 1125)
    assert decode_image(photo)[0].size == (6000, 4500)  # check-images, train's augmentation: no resize size
    assert jpeg_bytes(photo) is None  # --decode device leaves it to PIL, which decodes it reduced
    p = {"resize_size": 256, "crop_size": 224, "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.25] * 3}
    x = portable.preprocess(io.BytesIO(photo.read_bytes()), p, {"jpeg_draft_min_short_side": 512})
    assert np.array_equal(x, portable.normalise(portable.resize_crop(load_rgb(photo, 512), p), p))


def test_images_past_the_limit_that_cannot_decode_reduced_are_refused_in_one_wording_at_once(tmp_path):
    """A PNG of 12000 x 12000 said 'exceeds limit of 89478485', one of 14000 x 14000 'exceeds limit of
    178956970' (Pillow's two checks): one reason, naming the size and the limit. JPEGs declaring more than
    MAX_JPEG_PIXELS, progressive ones and those scanned a component at a time (libjpeg keeps all their
    coefficients: 545 bytes declaring 65000 x 65000 took 31 s and 12.4 GB at 1/8, 18000 x 14900 1.4 s and
    1.6 GB) are refused before any pixel is decoded."""
    import time

    from pipeline.data.folders import MAX_IMAGE_PIXELS
    from tests.badfiles import bomb_png

    files = {"a.png": bomb_png(12000, 12000), "b.png": bomb_png(14000, 14000), "c.jpg": declared_jpeg(65000, 65000),
             "d.jpg": declared_jpeg(12000, 9000, progressive=True),
             "e.jpg": declared_jpeg(12000, 9000, scan_of_one=True)}
    reasons = []
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        start = time.perf_counter()
        with pytest.raises(ImageLoadError) as e:
            load_rgb(tmp_path / name, 512)
        assert time.perf_counter() - start < 1 and e.value.kind == "decompression-bomb"
        reasons.append(e.value.reason)
    assert [r.split(",")[0] for r in reasons] == [
        "decompression bomb: 144000000 pixels", "decompression bomb: 196000000 pixels",
        "decompression bomb: 65000 x 65000 pixels"] + ["decompression bomb: 12000 x 9000 pixels"] * 2
    assert all(f"more than the {MAX_IMAGE_PIXELS} decoded" in r and "shrink the" in r for r in reasons)


def test_images_within_the_limit_decode_as_before(tmp_path):
    """Only images past the limit decode otherwise: within it, a JPEG decodes as Image.open, draft((D, D)) and
    load always did (the same array), and a serve upload is still bounded by its header's pixels."""
    from pipeline.data.folders import decode_bytes

    rng = np.random.default_rng(0)
    big = Image.merge("RGB", [Image.linear_gradient("L").resize((9400, 9400)).rotate(a) for a in (0, 90, 180)])
    big.save(tmp_path / "big.jpg", quality=90)  # 88.4 M pixels: just within
    Image.fromarray(rng.integers(0, 256, (1800, 2400, 3), dtype=np.uint8)).save(tmp_path / "mid.jpg")
    for name in ("big.jpg", "mid.jpg"):
        for side in (None, 224, 512):
            with Image.open(tmp_path / name) as im:
                if side and min(im.size) >= 2 * side:
                    im.draft("RGB", (side, side))
                im.load()
                assert np.array_equal(np.asarray(load_rgb(tmp_path / name, side)), np.asarray(im.convert("RGB")))
    for (w, h), kind in (((12000, 9000), "decompression-bomb"), ((8000, 6000), "too-many-pixels")):
        with pytest.raises(ImageLoadError) as e:
            decode_bytes(declared_jpeg(w, h), 512, 40_000_000)  # serve's --max-pixels: the header's pixels
        assert e.value.kind == kind


def test_a_photo_of_a_format_not_decoded_is_named_not_called_no_image(tmp_path):
    """An iPhone's HEIC photo named .jpg, a JPEG XL, a TIFF of 16-bit gray with alpha: each was 'not an image
    (unidentified format)', though it is a photo; now named, with what to do. A text file is still not an image."""
    from pipeline.data.folders import decode_bytes
    from tests.badfiles import HEIC_HEAD, JXL_HEAD, gray16_alpha_tiff

    files = {"IMG_0001.jpg": (HEIC_HEAD, "a HEIC photo, which is not decoded: convert it to JPEG first (heif-convert"),
             "x.jpg": (JXL_HEAD, "a JPEG XL image, which is not decoded: convert it to JPEG or PNG first"),
             "scan.tif": (gray16_alpha_tiff(), "a TIFF that is not decoded: damaged, or of a kind Pillow does not"),
             "notes.jpg": (b"shot on 2024-05-01\n", "not an image (unidentified format)")}
    for name, (data, said) in files.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ImageLoadError) as e:
            load_rgb(tmp_path / name)
        assert e.value.reason.startswith(said) and e.value.kind == "not-an-image", (name, e.value.reason)
        with pytest.raises(ImageLoadError) as e:  # an upload to serve
            decode_bytes(data)
        assert e.value.reason.startswith(said), (name, e.value.reason)


def test_a_photo_cut_short_is_said_to_be_cut_short(tmp_path):
    """A JPEG cut in its header (an interrupted copy of a phone photo with a large EXIF block) was 'not an image
    (unidentified format)', a WebP cut anywhere 'could not create decoder object', a GIF cut in its header 'not an
    image': each is now a file cut short (kind 'truncated', as check-images counts it), in every path alike."""
    import io

    from pipeline.data import portable
    from pipeline.data.folders import decode_bytes

    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x927C] = b"x" * 3000  # a maker note: the header of a phone photo is long

    def cut(fmt: str, keep: float, **options) -> bytes:
        out = io.BytesIO()
        im.save(out, fmt, **options)
        return out.getvalue()[:int(keep if keep > 1 else len(out.getvalue()) * keep)]

    p = {"resize_size": 40, "crop_size": 32, "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.25] * 3}
    for name, data, said in (
            ("a.jpg", cut("JPEG", 20, exif=exif.tobytes()), "a JPEG cut short (it ends before its end marker"),
            ("b.webp", cut("WEBP", 0.5), "a WebP cut short ("),
            ("c.gif", cut("GIF", 0.01), "a GIF cut short (it ends before its trailer")):
        (tmp_path / name).write_bytes(data)
        for read in (lambda: load_rgb(tmp_path / name), lambda: decode_bytes(data)):
            with pytest.raises(ImageLoadError) as e:
                read()
            assert e.value.reason.startswith(f"unreadable image: {said}") and e.value.kind == "truncated", (
                name, e.value.reason)
        with pytest.raises(portable.Refused) as rule:  # the export's rule, examples/predict_onnx.py
            portable.preprocess(str(tmp_path / name), p, {})
        assert str(rule.value) == e.value.reason
    webp = cut("WEBP", 1.0)
    assert portable.cut_short(io.BytesIO(webp[:100])) == (
        f"unreadable image: a WebP cut short (100 of the {len(webp)} bytes its header declares)")
    assert portable.cut_short(io.BytesIO(webp)) == ""
