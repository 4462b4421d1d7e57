"""fetch-data against a local HTTP server: resumed downloads, a complete file left alone, unsafe archives refused."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import socket
import tarfile
import threading
import time
import warnings
import zipfile
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.data import fetch, fetch_archives, fetch_download, fetch_unpack
from pipeline.data.fetch import FetchConfig, FetchResult, archive_name, download, fetch_data, shown_url
from pipeline.errors import PipelineError, UsageError
from tests.fsfaults import no_hang

NAME = "pets.zip"


def make_zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, data in entries.items():
            z.writestr(zipfile.ZipInfo(name), data)
    return buf.getvalue()


def pets_zip() -> bytes:
    """An archive laid out like Microsoft's: PetImages/{Cat,Dog} plus loose files at the top."""
    rng = np.random.default_rng(0)
    return make_zip({
        "PetImages/Cat/0.jpg": rng.bytes(150_000), "PetImages/Dog/0.jpg": rng.bytes(150_000),
        "PetImages/Cat/Thumbs.db": b"thumbs", "readme[1].txt": b"hello",
    })


#: a Last-Modified well before any answer's Date: a strong validator (RFC 9110 8.8.2.2)
LONG_AGO = "Tue, 01 Dec 2020 10:00:00 GMT"


def validators(srv, data: bytes, now: float = 0) -> dict[str, str]:
    """The headers naming this version of a file, as server.validators says: a strong ETag (the default),
    a weak one beside a Last-Modified ("weak"), only a Last-Modified ("modified"; "now": of this second,
    not a strong validator), or none ("none")."""
    tag = '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
    modified = srv.modified.get(tag, LONG_AGO)
    return {"etag": {"ETag": tag}, "weak": {"ETag": "W/" + tag, "Last-Modified": modified},
            "modified": {"Last-Modified": modified}, "now": {"Last-Modified": formatdate(now, usegmt=True)},
            "none": {}}[srv.validators]


class Handler(BaseHTTPRequestHandler):
    """Serves server.files with Range and If-Range support (server.validators; server.ignore_if_range: Range
    alone); server.drops > 0 cuts that many answers halfway; server.request_headers records each request's headers."""

    def do_GET(self):
        srv = self.server
        rng = self.headers.get("Range")
        srv.requests.append(rng)
        time.sleep(getattr(srv, "delay", 0))
        self.now = time.time()  # the answer's Date too
        srv.request_headers.append(dict(self.headers))
        path, _, query = self.path.lstrip("/").partition("?")
        data = srv.files.get(path)
        if getattr(srv, "busy", []):  # answers of an overloaded server (503, 429...), one per request
            code = srv.busy.pop(0)
            if isinstance(code, tuple):  # (503, {"Retry-After": "5"})
                self.send_response(code[0])
                for key, value in code[1].items():
                    self.send_header(key, value)
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self.send_error(code)
            return
        if getattr(srv, "auth", None) and self.headers.get("Authorization") != srv.auth:  # HTTP Basic
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="data"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if query in getattr(srv, "expired", ()):  # a signed link past its time, as S3 answers it
            self.send_error(403)
            return
        if data is None:
            self.send_error(404)
            return
        ours = validators(srv, data, self.now)
        if_range = self.headers.get("If-Range")
        if if_range and not srv.ignore_if_range and if_range not in (ours.get("ETag"), ours.get("Last-Modified")):
            rng = None  # another file than the client's .part: the whole of it (RFC 9110 13.1.5)
        start = 0
        if getattr(srv, "unsized", 0):  # no Content-Length: that many bytes, then the connection closes
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(srv.unsized // 65536):
                    self.wfile.write(b"\0" * 65536)
            except OSError:
                pass
            return
        if rng and not srv.ignore_range:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            start = 0 if getattr(srv, "range_from_zero", False) else start  # a server answering Range wrongly
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        for key, value in ours.items():
            self.send_header(key, value)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.drops > 0:
            srv.drops -= 1
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
            return
        for i in range(0, len(body), 20_000 if getattr(srv, "slow", False) else len(body) or 1):
            self.wfile.write(body[i:i + (20_000 if getattr(srv, "slow", False) else len(body))])
            time.sleep(0.02 if getattr(srv, "slow", False) else 0)

    def date_time_string(self, timestamp=None):
        return formatdate(timestamp or self.now, usegmt=True)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.files, srv.requests, srv.drops, srv.ignore_range = {NAME: pets_zip()}, [], 0, False
    srv.request_headers, srv.validators, srv.modified, srv.ignore_if_range = [], "etag", {}, False
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/{NAME}"
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{NAME}"


def cfg(dest, url, **kw) -> FetchConfig:
    return FetchConfig(dest=str(dest), url=url, timeout=5, retry_wait=0, **kw)


def test_downloads_unpacks_and_then_leaves_everything_alone(server, tmp_path):
    result = fetch_data(cfg(tmp_path, server.url))
    assert (tmp_path / NAME).read_bytes() == server.files[NAME]
    assert isinstance(result, FetchResult) and result.url == server.url
    assert result.unpacked == str(tmp_path / "PetImages") and result.bytes == len(server.files[NAME])
    assert (tmp_path / "PetImages" / "Dog" / "0.jpg").stat().st_size == 150_000
    assert not (tmp_path / f"{NAME}.part").exists()
    assert server.requests == [None]

    again = fetch_data(cfg(tmp_path, server.url))
    assert server.requests == [None], "a complete archive must not be downloaded again"
    assert (again.downloaded, again.unpacked_now, again.unpacked) == (False, False, result.unpacked)


def test_an_interrupted_download_resumes_by_itself(server, tmp_path):
    server.drops = 1
    fetch_data(cfg(tmp_path, server.url, retries=1))
    assert (tmp_path / NAME).read_bytes() == server.files[NAME]
    half = len(server.files[NAME]) // 2
    assert server.requests == [None, f"bytes={half}-"]


def test_an_overloaded_server_is_asked_again_as_a_dropped_connection_is(server, tmp_path):
    """A CDN answering 503 (or 429, 502, 504) for a moment, at the start or on a resume: fetch-data gave up at
    once ('the server answered HTTP 503 Service Unavailable'), its retries only for a dropped connection."""
    server.busy, server.drops = [503, 429], 1  # the first two asks answered 'busy', the third cut halfway
    fetch_data(cfg(tmp_path, server.url, retries=3))
    assert (tmp_path / NAME).read_bytes() == server.files[NAME]
    half = len(server.files[NAME]) // 2
    assert server.requests == [None, None, None, f"bytes={half}-"]


def test_a_server_busy_past_the_retries_says_so_in_one_line(server, tmp_path):
    server.busy = [503] * 5
    with pytest.raises(PipelineError) as e:
        fetch_data(cfg(tmp_path, server.url, retries=2))
    assert str(e.value) == f"cannot download {server.url}: the server answered HTTP 503 Service Unavailable, 3 times"
    assert len(server.requests) == 3


def test_an_interrupted_download_resumes_on_the_next_run(server, tmp_path):
    server.drops = 1
    with pytest.raises(PipelineError, match="run the same command again to resume"):
        fetch_data(cfg(tmp_path, server.url, retries=0))
    half = len(server.files[NAME]) // 2
    assert (tmp_path / f"{NAME}.part").read_bytes() == server.files[NAME][:half]
    assert not (tmp_path / NAME).exists() and not (tmp_path / "PetImages").exists()

    fetch_data(cfg(tmp_path, server.url))
    assert (tmp_path / NAME).read_bytes() == server.files[NAME]
    assert server.requests == [None, f"bytes={half}-"]


def test_a_server_that_ignores_range_restarts_the_download(server, tmp_path):
    server.ignore_range = True
    (tmp_path / f"{NAME}.part").write_bytes(b"x" * 1000)  # not a prefix of the file: must be overwritten
    fetch_data(cfg(tmp_path, server.url))
    assert (tmp_path / NAME).read_bytes() == server.files[NAME]
    assert server.requests == ["bytes=1000-"]


def test_a_complete_part_file_is_finished_on_416(server, tmp_path):
    (tmp_path / f"{NAME}.part").write_bytes(server.files[NAME])
    fetch_data(cfg(tmp_path, server.url))
    assert (tmp_path / NAME).read_bytes() == server.files[NAME]
    assert server.requests == [f"bytes={len(server.files[NAME])}-"]


def test_a_complete_archive_needs_no_network(tmp_path):
    (tmp_path / NAME).write_bytes(pets_zip())
    result = fetch_data(cfg(tmp_path, closed_port_url()))
    assert result.downloaded is False and (tmp_path / "PetImages" / "Cat" / "0.jpg").is_file()


def test_a_macos_zips_metadata_folder_is_not_taken_for_the_data_folder(tmp_path):
    (tmp_path / NAME).write_bytes(make_zip({"PetImages/Cat/0.jpg": b"ok", "PetImages/Dog/0.jpg": b"ok2",
                                            "__MACOSX/PetImages/Cat/._0.jpg": b"fork"}))
    result = fetch_data(cfg(tmp_path, closed_port_url()))
    assert result.unpacked == str(tmp_path / "PetImages")


@pytest.mark.parametrize("names, root", [
    (["food/images/apple/0.jpg", "food/images/pear/0.jpg", "food/README.md"], "food/images"),
    (["a/b/c/cat/0.jpg", "a/b/c/dog/0.jpg", "__MACOSX/a/._x"], "a/b/c"),
    (["PetImages/Cat/0.jpg", "PetImages/Dog/0.jpg", "readme.txt"], "PetImages"),
    (["animals/cat/0.jpg", "animals/dog/0.jpg"], "animals"),
    (["set/train/cat/0.jpg", "set/test/cat/0.jpg"], "set"),
])
def test_the_data_folder_named_is_the_one_holding_the_classes(tmp_path, names, root):
    """'food/images/{apple,pear}' was said to unpack to food, a data folder of one class (images): the folder to
    pass as --data is the one holding the class folders, below a chain of single folders."""
    (tmp_path / NAME).write_bytes(make_zip({n: b"photo" for n in names}))
    assert fetch_data(cfg(tmp_path, closed_port_url())).unpacked == str(tmp_path / root)


def test_an_archive_of_classes_at_its_top_is_refused_into_a_dest_holding_other_folders(tmp_path):
    """'fetch-data --url .../flowers.zip' (tulip/, rose/ at its top) into the default --dest data, which held
    PetImages from the first fetch: it unpacked beside it and said 'unpacked to data', a data folder whose
    classes were PetImages (cats and dogs together), rose and tulip. Refused before anything is unpacked; into
    a folder of its own it unpacks as before."""
    (tmp_path / "data" / "PetImages" / "Cat").mkdir(parents=True)
    (tmp_path / "data" / ".hidden").mkdir()  # never a class: no matter
    (tmp_path / "flowers.zip").write_bytes(make_zip({"tulip/0.jpg": b"t", "rose/0.jpg": b"r", "LICENSE": b"cc"}))
    url = f"file://{tmp_path}/flowers.zip"
    res = CliRunner().invoke(cli, ["-q", "fetch-data", "--dest", str(tmp_path / "data"), "--url", url])
    assert res.exit_code == 1 and res.output == (
        f"Error: flowers.zip has no single top folder: its folders (rose, tulip) would unpack into "
        f"{tmp_path / 'data'} beside PetImages, and as one data folder all would be its classes; fetch it into a "
        "--dest of its own (a new folder)\n")
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [".flowers.zip.url", ".hidden", "PetImages",
                                                                     "flowers.zip"]
    assert fetch_data(cfg(tmp_path / "flowers", url)).unpacked == str(tmp_path / "flowers")


def test_a_web_page_served_for_the_archive_is_named_as_one(server, tmp_path):
    """A moved download link (or a login page) answers 200 with a web page: fetch-data said 'pets.zip is neither a
    zip nor a tar archive; delete it and download again', and downloading again got the same page."""
    server.files[NAME] = b"\n  <!DOCTYPE html><html><body>This download has moved</body></html>"
    with pytest.raises(PipelineError) as e:
        fetch_data(cfg(tmp_path, server.url))
    assert str(e.value) == (f"{tmp_path / NAME} is a web page (HTML), not an archive: the server sent it in the "
                            "archive's place (a moved link, a login or error page?); delete it, download the archive "
                            f"by hand (in a browser), and run this again with url=file://<where you saved it>/{NAME}")


@pytest.mark.parametrize("name, head, what, how", [
    ("pets.7z", b"7z\xbc\xaf\x27\x1c\x00\x04", "a 7z archive", "7z x pets.7z"),
    ("pets.rar", b"Rar!\x1a\x07\x01\x00", "a RAR archive", "7z x pets.rar"),
    ("pets.tar.zst", b"\x28\xb5\x2f\xfd\x04\x58", "a Zstandard-compressed file", "tar --zstd -xf pets.tar.zst"),
])
def test_an_archive_of_a_format_python_cannot_unpack_is_named(tmp_path, name, head, what, how):
    """A .7z, .rar or .tar.zst was 'neither a zip nor a tar archive; delete it and download again', and downloading
    it again changed nothing: the format is named, with how to unpack it by hand."""
    (tmp_path / name).write_bytes(head + bytes(range(256)) * 4)
    with pytest.raises(PipelineError) as e:
        fetch_data(cfg(tmp_path, f"file://{tmp_path}/mirror/{name}"))
    assert str(e.value) == (f"{tmp_path / name} is {what}, which fetch-data cannot unpack (it unpacks zip, and tar "
                            f"plain or gz, bz2, xz compressed); unpack it by hand ({how}) and point data at the folder")


def test_connection_refused_is_one_clear_line(tmp_path):
    with pytest.raises(PipelineError) as e:
        fetch_data(cfg(tmp_path, closed_port_url()))
    msg = str(e.value)
    assert "\n" not in msg and "refused" in msg.lower()
    assert f"(or put it at {tmp_path / NAME}), or point data at a local image folder" in msg
    res = CliRunner().invoke(cli, ["fetch-data", "--dest", str(tmp_path), "--url", closed_port_url()])
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1


def test_a_served_archive_with_a_dotdot_entry_is_refused(server, tmp_path):
    server.files[NAME] = make_zip({"PetImages/Cat/0.jpg": b"ok", "../evil.txt": b"pwned"})
    dest = tmp_path / "dest"
    with pytest.raises(PipelineError, match="archive entry '../evil.txt' would be written outside"):
        fetch_data(cfg(dest, server.url))
    assert not (tmp_path / "evil.txt").exists()
    assert [p.name for p in dest.iterdir() if not p.name.startswith(".")] == [NAME]  # our own records aside


@pytest.mark.parametrize("evil", ["../evil.txt", "PetImages/../../evil.txt", "{abs}"])
def test_zip_entries_outside_dest_are_refused_before_anything_is_written(tmp_path, evil):
    dest = tmp_path / "dest"
    dest.mkdir()
    evil = evil.format(abs=tmp_path / "evil.txt")
    (dest / NAME).write_bytes(make_zip({"PetImages/Cat/0.jpg": b"ok", evil: b"pwned"}))
    with pytest.raises(PipelineError, match=f"archive entry {evil!r} would be written outside"):
        fetch_data(cfg(dest, closed_port_url()))
    assert not (tmp_path / "evil.txt").exists()
    assert [p.name for p in dest.iterdir()] == [NAME], "nothing may be unpacked from a refused archive"


def make_tar(path, members):
    with tarfile.open(path, "w:gz") as t:
        for info, data in members:
            t.addfile(info, io.BytesIO(data) if data is not None else None)


def file_member(name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def test_a_link_of_the_users_own_in_dest_is_named_when_an_entry_would_go_through_it(tmp_path):
    """data/PetImages made a link to another disk before the first fetch: refused (nothing is written through a
    link out of --dest) as 'archive entry 'PetImages/Cat/0.jpg' would be written outside data', which reads as a
    hostile archive; the refusal now names the link and what to do."""
    (tmp_path / "disk" / "PetImages").mkdir(parents=True)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "PetImages").symlink_to(tmp_path / "disk" / "PetImages")
    (tmp_path / "data" / NAME).write_bytes(pets_zip())
    with pytest.raises(PipelineError) as e:
        fetch_data(cfg(tmp_path / "data", closed_port_url()))
    assert str(e.value) == (f"archive entry 'PetImages/Cat/0.jpg' would be written through PetImages -> "
                            f"{tmp_path / 'disk' / 'PetImages'}, a link in {tmp_path / 'data'} to outside it; refusing "
                            "to unpack through it: fetch into the link's target as dest (or remove the link)")
    assert list((tmp_path / "disk" / "PetImages").iterdir()) == []


@pytest.mark.parametrize("kind, target", [(tarfile.SYMTYPE, "../../outside"), (tarfile.SYMTYPE, "/etc/passwd"),
                                          (tarfile.LNKTYPE, "../outside")])
def test_tar_links_pointing_outside_are_refused(tmp_path, kind, target):
    dest = tmp_path / "dest"
    dest.mkdir()
    link = tarfile.TarInfo("PetImages/link")
    link.type, link.linkname = kind, target
    make_tar(dest / "pets.tar.gz", [file_member("PetImages/Cat/0.jpg", b"ok"), (link, None)])
    with pytest.raises(PipelineError, match="'PetImages/link' links to"):
        fetch_data(cfg(dest, closed_port_url().replace(NAME, "pets.tar.gz")))
    assert sorted(p.name for p in dest.iterdir()) == ["pets.tar.gz"]


def test_a_dotdot_entry_through_a_symlink_is_refused(tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    link = tarfile.TarInfo("l")
    link.type, link.linkname = tarfile.SYMTYPE, "."  # harmless alone, but l/../x escapes once it exists
    make_tar(dest / "pets.tar.gz", [(link, None), file_member("l/../evil.txt", b"x")])
    with pytest.raises(PipelineError, match="'l/../evil.txt' would be written outside"):
        fetch_data(cfg(dest, closed_port_url().replace(NAME, "pets.tar.gz")))
    assert sorted(p.name for p in dest.iterdir()) == ["pets.tar.gz"] and not (tmp_path / "evil.txt").exists()


def test_a_safe_tar_is_recognised_by_content_and_unpacked(tmp_path):
    link = tarfile.TarInfo("PetImages/Cat/same.jpg")
    link.type, link.linkname = tarfile.SYMTYPE, "0.jpg"
    make_tar(tmp_path / "pets.bin", [file_member("PetImages/Cat/0.jpg", b"ok"),
                                     file_member("PetImages/Dog/0.jpg", b"ok2"), (link, None)])
    res = CliRunner().invoke(cli, ["fetch-data", "--dest", str(tmp_path), "--json",
                                   "--url", closed_port_url().replace(NAME, "pets.bin")])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["unpacked"] == str(tmp_path / "PetImages")
    assert (tmp_path / "PetImages" / "Cat" / "same.jpg").read_bytes() == b"ok"


def test_bad_url_is_a_usage_error(tmp_path):
    res = CliRunner().invoke(cli, ["fetch-data", "--dest", str(tmp_path), "--url", "ftp://example.com/x.zip"])
    assert res.exit_code == 2 and "ftp://example.com/x.zip" in res.output


@pytest.mark.parametrize("url", ["http://[::1", "http://127.0.0.1:99999/x.zip", "http://127.0.0.1:abc/x.zip"])
def test_a_malformed_url_is_a_usage_error_not_a_bug(tmp_path, url):
    res = CliRunner().invoke(cli, ["fetch-data", "--dest", str(tmp_path), "--url", url])
    assert res.exit_code == 2 and f"Error: --url {url!r} is not a valid URL (" in res.output
    assert len(res.output.strip().splitlines()) == 1 and "bug" not in res.output


ESCAPE = "..%2F..%2Fescape.tar"


def escape_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        info, data = file_member("PetImages/Cat/0.jpg", b"ok")
        t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("scheme", ["http", "file"])
def test_an_encoded_slash_in_the_url_never_writes_outside_dest(server, tmp_path, scheme):
    dest = tmp_path / "d" / "inner"
    if scheme == "http":
        server.files[f"x/{ESCAPE}"] = escape_tar()
        url = server.url.replace(NAME, f"x/{ESCAPE}")
    else:
        (tmp_path / "src" / "x").mkdir(parents=True)
        (tmp_path / "escape.tar").write_bytes(escape_tar())  # where src/x/../../escape.tar leads
        url = f"file://{tmp_path}/src/x/{ESCAPE}"
    with pytest.raises(ValueError, match=r"'\.\./\.\./escape\.tar' is not a plain file name"):
        fetch_data(cfg(dest, url))
    assert not (tmp_path / "d" / "escape.tar").exists() and not list((tmp_path / "d").rglob("*.tar*"))
    res = CliRunner().invoke(cli, ["fetch-data", "--dest", str(dest), "--url", url])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1 and "plain file name" in res.output


@pytest.mark.parametrize("name", ["%2E%2E", ".hidden.zip", "a%5Cb.zip", "a%00b.zip", "%0A.zip", "x" * 300])
def test_unsafe_archive_names_are_refused(name):
    with pytest.raises(ValueError, match="not a plain file name"):
        archive_name(f"http://127.0.0.1/{name}")
    assert archive_name("http://127.0.0.1/dir/pets%20v2.zip?x=1") == "pets v2.zip"


def test_dest_that_is_a_file_is_a_usage_error(tmp_path):
    (tmp_path / "f").write_text("x")
    for dest in (tmp_path / "f", tmp_path / "f" / "sub"):
        res = CliRunner().invoke(cli, ["fetch-data", "--dest", str(dest), "--url", closed_port_url()])
        assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
        assert "--dest" in res.output and "must be a folder" in res.output


def test_unpacking_never_overwrites_files_already_there(tmp_path):
    (tmp_path / NAME).write_bytes(pets_zip())
    mine = tmp_path / "PetImages" / "Dog" / "0.jpg"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"my own photo")
    with pytest.raises(PipelineError, match=f"{mine} already exists.*unpack over it with overwrite=True$"):
        fetch_data(cfg(tmp_path, closed_port_url()))
    assert mine.read_bytes() == b"my own photo" and not (tmp_path / "PetImages" / "Cat").exists()
    fetch_data(cfg(tmp_path, closed_port_url(), overwrite=True))
    assert mine.stat().st_size == 150_000


def test_an_archive_is_never_merged_silently_into_a_folder_of_another(tmp_path):
    """A second cats-and-dogs archive (another name, its photos named otherwise) into a --dest holding the first's
    PetImages: unpacked into it without a word ('unpacked to PetImages'), a data folder now holding both sets.
    Refused before anything is written, naming the folder and a file; --overwrite unpacks into it."""
    theirs = tmp_path / "PetImages" / "Cat" / "cat.1.jpg"
    theirs.parent.mkdir(parents=True)
    theirs.write_bytes(b"a photo of the first archive")
    (tmp_path / "PetImages" / "Cat" / ".DS_Store").write_bytes(b"")  # the system's: no matter
    (tmp_path / NAME).write_bytes(pets_zip())
    with pytest.raises(PipelineError) as e:
        fetch_data(cfg(tmp_path, closed_port_url()))
    assert str(e.value) == (f"{tmp_path / 'PetImages'} already holds 1 file not from {NAME} (Cat/cat.1.jpg): "
                            f"unpacked into it, one data folder would hold both; fetch it into a dest of its own, "
                            "or pass overwrite=True to unpack into it anyway")
    assert sorted(p.name for p in (tmp_path / "PetImages").rglob("*")) == [".DS_Store", "Cat", "cat.1.jpg"]
    assert fetch_data(cfg(tmp_path, closed_port_url(), overwrite=True)).unpacked == str(tmp_path / "PetImages")
    assert theirs.is_file() and (tmp_path / "PetImages" / "Dog" / "0.jpg").is_file()


def test_an_interrupted_unpack_may_replace_its_own_files(tmp_path, monkeypatch):
    (tmp_path / NAME).write_bytes(pets_zip())
    real = zipfile.ZipFile.extract
    calls = []

    def dies_on_the_second(self, member, path=None, pwd=None):
        calls.append(member)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(self, member, path, pwd)

    monkeypatch.setattr(zipfile.ZipFile, "extract", dies_on_the_second)
    with pytest.raises(PipelineError, match="no space left on the device") as full:
        fetch_data(cfg(tmp_path, closed_port_url()))
    assert str(full.value).endswith("the same command finishes the unpack once this is fixed")  # it said nothing
    monkeypatch.setattr(zipfile.ZipFile, "extract", real)
    assert (tmp_path / "PetImages" / "Cat" / "0.jpg").is_file()
    result = fetch_data(cfg(tmp_path, closed_port_url()))
    assert result.unpacked_now and (tmp_path / "PetImages" / "Dog" / "0.jpg").stat().st_size == 150_000
    assert not (tmp_path / f".{NAME}.unpacking").exists()


def test_another_url_with_the_same_archive_name_is_never_taken_for_the_first(tmp_path):
    for which in ("A", "B"):
        (tmp_path / "src" / which).mkdir(parents=True)
        (tmp_path / "src" / which / "data.zip").write_bytes(make_zip({f"{which}/x/{which}.txt": which.encode()}))
    dest = tmp_path / "dest"
    fetch_data(cfg(dest, f"file://{tmp_path}/src/A/data.zip"))
    with pytest.raises(ValueError, match="fetched from file://.*/A/data.zip, not .*/B/data.zip"):
        fetch_data(cfg(dest, f"file://{tmp_path}/src/B/data.zip"))
    result = fetch_data(cfg(dest, f"file://{tmp_path}/src/B/data.zip", overwrite=True))
    assert result.downloaded and (dest / "B" / "x" / "B.txt").read_text() == "B"
    assert fetch_data(cfg(dest, f"file://{tmp_path}/src/B/data.zip")).downloaded is False


def test_a_file_url_naming_no_file_is_a_usage_error_not_offline(tmp_path):
    """--url file:///nope.zip said "cannot download ... offline?" and exited 1, as if the network had failed: a
    path typed wrong is the user's to fix (exit 2), and nothing is made in --dest."""
    r = CliRunner().invoke(cli, ["fetch-data", "--url", f"file://{tmp_path}/nope.zip", "--dest", str(tmp_path / "d")])
    assert r.exit_code == 2 and r.output == (f"Error: --url 'file://{tmp_path}/nope.zip' names no file: "
                                             f"'{tmp_path}/nope.zip' does not exist or is not a file\n"), r.output
    assert not (tmp_path / "d").exists()


def test_overwrite_never_removes_the_file_the_url_names(tmp_path):
    """--url file://DEST/data.zip is the archive's own place: a stale record from another URL must not
    make --overwrite delete the very file it is asked to read."""
    dest = tmp_path / "dest"
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "data.zip").write_bytes(make_zip({"A/x/A.txt": b"A"}))
    fetch_data(cfg(dest, f"file://{tmp_path}/src/data.zip"))
    mine = make_zip({"B/x/B.txt": b"B"})
    (dest / "data.zip").write_bytes(mine)  # the user's own zip, put where the first download was
    result = fetch_data(cfg(dest, f"file://{dest}/data.zip", overwrite=True))
    assert (dest / "data.zip").read_bytes() == mine and (dest / "B" / "x" / "B.txt").read_text() == "B"
    assert result.downloaded is False


def test_an_entry_that_would_replace_its_own_archive_is_refused_even_with_overwrite(tmp_path):
    (tmp_path / "data.zip").write_bytes(make_zip({"data.zip": b"not the archive"}))
    with pytest.raises(PipelineError, match="the file it is unpacked from"):
        fetch_data(cfg(tmp_path, f"file://{tmp_path}/data.zip", overwrite=True))
    assert zipfile.is_zipfile(tmp_path / "data.zip")


def link_member(name, kind, target):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


@pytest.mark.parametrize("members, refusal", [
    ([link_member("s", tarfile.SYMTYPE, "mine"), file_member("s/photo.jpg", b"pwned")], "written through a link"),
    ([link_member("s", tarfile.SYMTYPE, "mine/photo.jpg"), file_member("s", b"pwned")], "written through a link"),
    ([link_member("h", tarfile.LNKTYPE, "mine/photo.jpg"), file_member("h", b"pwned")], "not a file of the archive"),
    ([link_member("h", tarfile.LNKTYPE, "pets.tar.gz"), file_member("h", b"pwned")], "not a file of the archive"),
])
def test_a_tar_never_writes_through_its_own_links_into_files_already_there(tmp_path, members, refusal):
    """A link inside dest passes the outside checks; writing through it replaced the user's photo (or the
    archive being read) without --overwrite."""
    mine = tmp_path / "mine" / "photo.jpg"
    mine.parent.mkdir()
    mine.write_bytes(b"my own photo")
    make_tar(tmp_path / "pets.tar.gz", members)
    archive = (tmp_path / "pets.tar.gz").read_bytes()
    with pytest.raises(PipelineError, match=refusal):
        fetch_data(cfg(tmp_path, closed_port_url().replace(NAME, "pets.tar.gz"), overwrite=True))
    assert mine.read_bytes() == b"my own photo" and (tmp_path / "pets.tar.gz").read_bytes() == archive
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "pets.tar.gz"]



def zip_of(entries) -> bytes:
    """A zip of (name, data, is a symlink) entries, in order; duplicates kept (make_zip's dict cannot)."""
    buf = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w") as z:
        warnings.simplefilter("ignore")  # 'Duplicate name'
        for name, data, link in entries:
            info = zipfile.ZipInfo(name)
            info.external_attr = 0o120777 << 16 if link else 0
            z.writestr(info, data)
    return buf.getvalue()


def dir_member(name):
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info, None


@pytest.mark.parametrize("kind, entries, refusal", [
    ("zip", [("link", b"PetImages", True), ("link/x.jpg", b"p", False)],
     "'link/x.jpg' would be written inside 'link', which an earlier entry makes a symbolic link (a zip's"),
    ("zip", [("b", b"f", False), ("b/x.jpg", b"p", False)], "'b/x.jpg' would be written inside 'b', which an earlier"),
    ("zip", [("b", b"f", False), ("b/", b"", False)],
     "'b/' is a folder, but another entry of the archive makes it a file;"),
    ("zip", [("b/", b"", False), ("b", b"f", False)],
     "'b' is a file, but another entry of the archive makes it a folder;"),
    ("zip", [("b/0.jpg", b"x", False), ("b/0.jpg", b"y", False)], "'b/0.jpg' is named twice in the archive"),
    ("tar", [file_member("b", b"f"), file_member("b/x.jpg", b"p")], "'b/x.jpg' would be written inside 'b', which"),
    ("tar", [file_member("b", b"f"), dir_member("b")], "'b' is a folder, but another entry of the archive makes it"),
    ("tar", [file_member("b/0.jpg", b"x"), file_member("./b/0.jpg", b"yy")], "'./b/0.jpg' is named twice"),
])
def test_an_archive_whose_entries_clash_is_refused_before_anything_is_written(tmp_path, kind, entries, refusal):
    """An entry inside an earlier file entry (or a zip's link, unpacked as a file then) stopped unpacking halfway with
    'Not a directory' (or 'File exists', 'Is a directory') after the first entries were written; a file named
    twice was silently replaced by its second copy. Each is refused up front, in one line naming the entry."""
    name = "pets.zip" if kind == "zip" else "pets.tar.gz"
    if kind == "zip":
        (tmp_path / name).write_bytes(zip_of([("PetImages/Cat/0.jpg", b"ok", False), *entries]))
    else:
        make_tar(tmp_path / name, [file_member("PetImages/Cat/0.jpg", b"ok"), *entries])
    url = closed_port_url().replace(NAME, name)
    res = CliRunner().invoke(cli, ["-q", "fetch-data", "--dest", str(tmp_path), "--url", url])
    assert res.exit_code == 1 and res.output.startswith("Error: archive entry ") and refusal in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and "refusing to unpack" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_a_zips_symbolic_links_are_skipped_with_a_warning_naming_them(tmp_path, caplog):
    """A zip's link (zip -y) was unpacked as a small file holding its target's name: 'Cat/same.jpg', 9 bytes of
    '0.jpg', a broken photo in a class folder, said nowhere. Links are now left out, one warning naming them."""
    (tmp_path / NAME).write_bytes(zip_of([("P/Cat/0.jpg", b"x" * 100, False), ("P/Cat/same.jpg", b"0.jpg", True),
                                          ("P/Dog/0.jpg", b"y", False), ("P/Dog/up", b"../../../etc", True)]))
    with caplog.at_level(logging.INFO):
        result = fetch_data(cfg(tmp_path, closed_port_url()))
    assert result.unpacked == str(tmp_path / "P")
    assert sorted(str(p.relative_to(tmp_path / "P")) for p in (tmp_path / "P").rglob("*")) == [
        "Cat", "Cat/0.jpg", "Dog", "Dog/0.jpg"]
    warned = [r.getMessage() for r in caplog.records if "symbolic link" in r.getMessage()]
    assert len(warned) == 1 and "2 symbolic links, not unpacked" in warned[0]
    assert "'P/Cat/same.jpg', 'P/Dog/up'" in warned[0]
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("unpacked ")] == [
        f"unpacked 2 entries of {NAME} to {tmp_path / 'P'}"]  # the links not among them


@pytest.mark.parametrize("second", ["P/Cat/A.jpg", "P/cat/b.jpg"])
def test_names_differing_only_in_case_are_refused_where_the_file_system_ignores_case(tmp_path, monkeypatch, second):
    """On a case-insensitive file system (macOS, Windows, a FAT drive) 'Cat/A.jpg' silently replaced 'Cat/a.jpg',
    and 'cat/' joined 'Cat/' into one class. Refused there before anything is written; a case-sensitive one
    unpacks both."""
    import pipeline.data.fetch as fetch
    (tmp_path / NAME).write_bytes(zip_of([("P/Cat/a.jpg", b"1", False), (second, b"2", False),
                                          ("P/Dog/0.jpg", b"3", False)]))
    assert not fetch.ignores_case(tmp_path) and not list(tmp_path.glob(".fetch-data-case-probe-*"))
    monkeypatch.setattr(fetch_unpack, "ignores_case", lambda dest: True)
    clash = "'P/Cat/a.jpg' and 'P/Cat/A.jpg'" if second.endswith("A.jpg") else "'P/Cat' and 'P/cat'"
    with pytest.raises(PipelineError, match=f"archive entries {clash} differ only in case"):
        fetch_data(cfg(tmp_path, closed_port_url()))
    assert sorted(p.name for p in tmp_path.iterdir()) == [NAME]
    monkeypatch.undo()
    assert fetch_data(cfg(tmp_path, closed_port_url())).unpacked_now and (tmp_path / second).read_bytes() == b"2"


def test_a_zip_made_on_windows_with_backslashes_unpacks_into_its_folders(tmp_path):
    """Windows' PowerShell (Compress-Archive, .NET Framework) writes 'PetImages\\Cat\\0.jpg': Python's zipfile on
    Linux or macOS unpacked it as one file of that name at the top of --dest, and fetch-data said it unpacked to
    --dest itself (no class folders in it). A zip made on Windows (FAT, NTFS) has no backslash in a name."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name in ("PetImages\\", "PetImages\\Cat\\0.jpg", "PetImages\\Dog\\0.jpg"):
            info = zipfile.ZipInfo(name)
            info.create_system = 0  # MS-DOS / Windows
            z.writestr(info, b"" if name.endswith("\\") else b"photo")
    (tmp_path / NAME).write_bytes(buf.getvalue())
    result = fetch_data(cfg(tmp_path, closed_port_url()))
    assert result.unpacked == str(tmp_path / "PetImages")
    assert (tmp_path / "PetImages" / "Dog" / "0.jpg").read_bytes() == b"photo"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["PetImages", NAME]


def test_a_windows_zips_backslashed_dotdot_is_refused(tmp_path):
    info = zipfile.ZipInfo("..\\..\\evil.jpg")
    info.create_system = 0
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(info, b"x")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / NAME).write_bytes(buf.getvalue())
    with pytest.raises(PipelineError, match="would be written outside"):
        fetch_data(cfg(tmp_path / "d", closed_port_url()))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["d", NAME]


def test_folder_entries_named_twice_and_folders_implied_by_files_still_unpack(tmp_path):
    (tmp_path / NAME).write_bytes(zip_of([("P/Cat/0.jpg", b"x", False), ("P/", b"", False), ("P/Cat/", b"", False),
                                          ("P/Cat/", b"", False), ("./P/Dog/0.jpg", b"y", False)]))
    assert fetch_data(cfg(tmp_path, closed_port_url())).unpacked == str(tmp_path / "P")
    assert (tmp_path / "P" / "Dog" / "0.jpg").read_bytes() == b"y"

def test_a_part_file_of_another_url_is_never_resumed_with_this_ones_bytes(server, tmp_path):
    """A cut-off download of .../A/pets.zip was resumed from .../B/pets.zip: half of each, a broken zip."""
    other = make_zip({"B/x/B.bin": np.random.default_rng(1).bytes(200_000)})
    server.files["B/" + NAME], server.drops = other, 1
    with pytest.raises(PipelineError, match="run the same command again to resume"):
        fetch_data(cfg(tmp_path, server.url, retries=0))
    url_b = server.url.replace(NAME, "B/" + NAME)
    with pytest.raises(ValueError, match=f"{NAME}.part in dest was partly fetched from {server.url}, not {url_b}"):
        fetch_data(cfg(tmp_path, url_b))
    assert (tmp_path / f"{NAME}.part").stat().st_size == len(server.files[NAME]) // 2
    result = fetch_data(cfg(tmp_path, url_b, overwrite=True))
    assert (tmp_path / NAME).read_bytes() == other and result.unpacked == str(tmp_path / "B")
    assert server.requests[-1] is None, "B must be fetched from its first byte"


@pytest.mark.parametrize("record", [".pets.tar.gz.unpacked", "./.pets.tar.gz.url", ".pets.tar.gz.unpacking",
                                    "pets.tar.gz.part"])
def test_an_entry_named_as_fetch_datas_own_records_is_refused(tmp_path, record):
    """A link named .pets.tar.gz.unpacked to a photo already in dest: the marker written after unpacking
    went through it, replacing the photo with JSON."""
    mine = tmp_path / "mine" / "photo.jpg"
    mine.parent.mkdir()
    mine.write_bytes(b"my own photo")
    make_tar(tmp_path / "pets.tar.gz", [link_member(record, tarfile.SYMTYPE, "mine/photo.jpg"),
                                        file_member("PetImages/Cat/0.jpg", b"ok")])
    with pytest.raises(PipelineError, match="would take the place of fetch-data's own"):
        fetch_data(cfg(tmp_path, closed_port_url().replace(NAME, "pets.tar.gz")))
    assert mine.read_bytes() == b"my own photo" and not (tmp_path / "PetImages").exists()


def patched_zip(flag_or: int = 0, method: int = None) -> bytes:
    """pets_zip's layout with every entry's flag bits or compression method changed in place (headers only)."""
    import struct

    data = bytearray(make_zip({"PetImages/Cat/0.jpg": b"ok", "PetImages/Dog/0.jpg": b"ok2"}))
    for sig, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        i = data.find(sig)
        while i >= 0:
            data[i + flag_at] |= flag_or
            if method is not None:
                data[i + flag_at + 2:i + flag_at + 4] = struct.pack("<H", method)
            i = data.find(sig, i + 4)
    return bytes(data)


@pytest.mark.parametrize("archive, refusal", [(patched_zip(flag_or=1), "is encrypted"),
                                              (patched_zip(method=9), "compressed with method 9 (Deflate64)"),
                                              (patched_zip(method=98), "compressed with method 98 (PPMd)")])
def test_a_zip_python_cannot_unpack_is_refused_before_anything_is_written(tmp_path, archive, refusal):
    """A password-protected zip, or Windows' Deflate64 one (large zips from Explorer), stopped after making
    folders with 'unexpected RuntimeError/NotImplementedError ... a bug?'."""
    (tmp_path / NAME).write_bytes(archive)
    res = CliRunner().invoke(cli, ["-q", "fetch-data", "--dest", str(tmp_path), "--url", closed_port_url()])
    assert res.exit_code == 1 and refusal in res.output and "bug" not in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "PetImages").exists()


def test_a_zip_whose_compressed_data_is_damaged_is_one_line(tmp_path):
    """A damaged deflate stream raised zlib.error: 'unexpected error: Error -3 while decompressing data ... a bug?'."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("PetImages/Cat/0.jpg", b"hello world " * 5000)
    data = bytearray(buf.getvalue())
    start = data.find(b"PetImages/Cat/0.jpg") + len("PetImages/Cat/0.jpg")
    data[start:start + 3] = b"\xff\xff\xff"  # an invalid block type
    (tmp_path / NAME).write_bytes(bytes(data))
    res = CliRunner().invoke(cli, ["-q", "fetch-data", "--dest", str(tmp_path), "--url", closed_port_url()])
    assert res.exit_code == 1 and "bug" not in res.output, res.output
    assert res.output.startswith(f"Error: cannot unpack {tmp_path / NAME}: Error -3") and "download again" in res.output


def small_disk(monkeypatch, free):
    import shutil

    usage = shutil._ntuple_diskusage(10 * free, 9 * free, free)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage)


def test_a_decompression_bomb_is_refused_before_it_fills_the_disk(tmp_path, monkeypatch):
    """4 MB of zeros deflate to 4 KB: unpacking wrote until the disk was full, leaving half of it. (The free
    space is checked on its own here: the ratio limit, below, would refuse this one first.)"""
    monkeypatch.setattr(fetch_archives, "MAX_RATIO", 10_000)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("PetImages/Cat/0.jpg", b"\0" * (4 << 20))
    (tmp_path / "bomb.zip").write_bytes(buf.getvalue())
    assert len(buf.getvalue()) < 10_000
    small_disk(monkeypatch, 1 << 20)
    res = CliRunner().invoke(cli, ["fetch-data", "--dest", str(tmp_path), "--url", f"file://{tmp_path}/bomb.zip"])
    assert res.exit_code == 1 and "unpacking bomb.zip needs 4.2 MB but" in res.output and "1.0 MB free" in res.output
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["bomb.zip"]


def test_an_unpack_over_its_own_files_needs_room_only_for_what_they_lack(tmp_path, monkeypatch):
    """An --overwrite (or resumed) unpack counted the files already in --dest again: refused with room enough."""
    monkeypatch.setattr(fetch_archives, "MAX_RATIO", 10_000)  # zeros: the free space alone is tested
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name in ("PetImages/Cat/0.jpg", "PetImages/Dog/0.jpg"):
            z.writestr(name, b"\0" * (2 << 20))
    (tmp_path / "pets.zip").write_bytes(buf.getvalue())
    (tmp_path / "PetImages" / "Cat").mkdir(parents=True)
    (tmp_path / "PetImages" / "Cat" / "0.jpg").write_bytes(b"\0" * (2 << 20))  # unpacked before
    small_disk(monkeypatch, 3 << 20)
    res = CliRunner().invoke(cli, ["fetch-data", "--dest", str(tmp_path), "--url", f"file://{tmp_path}/pets.zip",
                                   "--overwrite"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "PetImages" / "Dog" / "0.jpg").stat().st_size == 2 << 20


def deflated(entries: dict, method=zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return buf.getvalue()


def test_a_zip_bomb_is_refused_naming_the_entry_and_the_limit_while_photos_and_a_readme_pass(tmp_path):
    """A 20 KB zip declaring 20 MB (zeros, 1000:1) was unpacked whenever the disk had room (300 MB from 370 KB);
    photos barely compress, and a small readme may compress as it likes."""
    rng = np.random.default_rng(0)
    bomb = deflated({"PetImages/Cat/0.jpg": rng.bytes(50_000), "PetImages/Dog/1.jpg": b"\0" * (20 << 20)})
    assert len(bomb) < 100_000
    (tmp_path / "bomb.zip").write_bytes(bomb)
    res = CliRunner().invoke(cli, ["-q", "fetch-data", "--dest", str(tmp_path / "d"), "--url",
                                   f"file://{tmp_path}/bomb.zip"])
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1, res.output
    assert "archive entry 'PetImages/Dog/1.jpg' declares 21.0 MB from" in res.output and "over the 100:1" in res.output
    assert not (tmp_path / "d" / "PetImages").exists()

    photos = {f"PetImages/{c}/{i}.jpg": rng.bytes(300_000) for c in ("Cat", "Dog") for i in range(4)}
    kaggle = deflated({**photos, "PetImages/Cat/Thumbs.db": rng.bytes(20_000) + b"\0" * 50_000,
                       "readme[1].txt": b"Microsoft Kaggle cats and dogs. " * 20_000})  # 640 KB, 400:1
    (tmp_path / "pets.zip").write_bytes(kaggle)
    result = fetch_data(cfg(tmp_path / "ok", f"file://{tmp_path}/pets.zip"))
    assert result.unpacked == str(tmp_path / "ok" / "PetImages") and result.unpacked_now


@pytest.mark.parametrize("mode", ["w:gz", "w:bz2", "w:xz"])
def test_a_compressed_tar_bomb_is_refused_by_its_total_before_anything_is_written(tmp_path, mode):
    """A tar's entries have no compressed size of their own: the archive as a whole is held to the limit."""
    with tarfile.open(tmp_path / "bomb.tar", mode) as t, open("/dev/zero", "rb") as zeros:
        for name in ("PetImages/Cat/0.jpg", "PetImages/Dog/0.jpg"):
            info = tarfile.TarInfo(name)
            info.size = 8 << 20
            t.addfile(info, zeros)
    with pytest.raises(PipelineError, match=r"bomb.tar declares 16.8 MB unpacked from .* over the 100:1"):
        fetch_data(cfg(tmp_path / "d", f"file://{tmp_path}/bomb.tar"))
    assert not (tmp_path / "d" / "PetImages").exists()


def test_a_zip_entry_holding_more_than_it_declares_writes_no_more_than_declared(tmp_path):
    """Declared sizes can lie: an entry declaring 1,000 bytes (ratio 0.02) whose data inflates to 50 MB. zipfile
    stops at the declared size and fails the entry's CRC: one line, and the file holds at most 1,000 bytes."""
    import struct

    data = bytearray(deflated({"PetImages/Cat/0.jpg": b"\0" * (50 << 20)}))
    for sig, at in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):  # the uncompressed size, local and central
        i = data.find(sig)
        data[i + at:i + at + 4] = struct.pack("<I", 1000)
    (tmp_path / "liar.zip").write_bytes(bytes(data))
    with pytest.raises(PipelineError, match="cannot unpack .*Bad CRC-32"):
        fetch_data(cfg(tmp_path / "d", f"file://{tmp_path}/liar.zip"))
    assert (tmp_path / "d" / "PetImages" / "Cat" / "0.jpg").stat().st_size <= 1000


def test_a_failed_fetch_removes_only_the_empty_folders_it_made(tmp_path):
    """Offline, 'fetch-data --dest data/new' left data/new behind, empty: the folders it made are removed while
    empty, never one that was there before, nor one holding anything (here the refused archive)."""
    (tmp_path / "data").mkdir()
    with pytest.raises(PipelineError, match="offline") as e:
        fetch_data(cfg(tmp_path / "data" / "new" / "sub", closed_port_url()))
    assert list(tmp_path.iterdir()) == [tmp_path / "data"] and list((tmp_path / "data").iterdir()) == []
    assert f"url=file://<where you saved it>/{NAME}" in str(e.value)  # a way in that needs no folder made first
    with pytest.raises(PipelineError, match="offline"):
        fetch_data(cfg(tmp_path / "data", closed_port_url()))
    assert (tmp_path / "data").is_dir()  # there before: kept
    (tmp_path / "bomb.zip").write_bytes(deflated({"PetImages/Cat/0.jpg": b"\0" * (4 << 20)}))
    with pytest.raises(PipelineError, match="over the 100:1"):
        fetch_data(cfg(tmp_path / "data" / "new", f"file://{tmp_path}/bomb.zip"))
    assert (tmp_path / "data" / "new" / "bomb.zip").is_file()  # holds the archive: kept


def test_a_download_larger_than_the_free_space_is_refused_before_writing(server, tmp_path, monkeypatch):
    small_disk(monkeypatch, 1000)
    with pytest.raises(PipelineError, match=f"downloading {NAME} .* needs 0.3 MB but .* 0.0 MB free"):
        fetch_data(cfg(tmp_path, server.url))
    assert not (tmp_path / f"{NAME}.part").exists() or (tmp_path / f"{NAME}.part").stat().st_size == 0


def test_a_download_that_never_started_leaves_no_record_of_its_url(tmp_path):
    """The offline message says to put the archive there by hand: it must then be taken, whatever URL follows."""
    with pytest.raises(PipelineError, match="put it at"):
        fetch_data(cfg(tmp_path, closed_port_url()))
    assert list(tmp_path.iterdir()) == []
    (tmp_path / NAME).write_bytes(pets_zip())  # fetched by hand from a mirror
    result = fetch_data(cfg(tmp_path, f"file://{tmp_path}/mirror/{NAME}"))
    assert result.downloaded is False and result.unpacked == str(tmp_path / "PetImages")


def test_a_download_of_unknown_size_stops_before_the_disk_is_full(server, tmp_path, monkeypatch):
    """A server that never says how large the file is (here 8 MB, on a disk with 3 MB to spare) filled the disk."""
    from pipeline.data import fetch

    server.unsized = 8 << 20
    real = fetch_download.shutil.disk_usage
    written = []

    def usage(path):  # the disk fills as the .part grows: 3 MB free above the margin at the start
        part = tmp_path / f"{NAME}.part"
        written.append(part.stat().st_size if part.exists() else 0)
        return real(path)._replace(free=getattr(fetch, "UNKNOWN_SIZE_MARGIN", 64 << 20) + (3 << 20) - written[-1])

    monkeypatch.setattr(fetch_download.shutil, "disk_usage", usage)
    with no_hang(30), pytest.raises(PipelineError, match="of a size the server did not say.* MB free"):
        fetch_data(cfg(tmp_path, server.url))
    assert 2 << 20 <= (tmp_path / f"{NAME}.part").stat().st_size <= 3 << 20


def test_two_fetches_into_one_dest_at_once_download_once(server, tmp_path):
    """Two demo or fetch-data runs at once wrote one .part together: one ended in 'unexpected
    FileNotFoundError' (the other had renamed it), or both appended a resumed .part twice."""
    server.slow = True  # 0.3 MB in 20 KB pieces: about 0.3 s, while the other waits for the folder
    results = []

    def run():
        try:
            results.append(fetch_data(cfg(tmp_path, server.url)).unpacked)
        except Exception as e:  # the test reports it
            results.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [str(tmp_path / "PetImages")] * 2
    assert (tmp_path / NAME).read_bytes() == server.files[NAME] and server.requests == [None]


def test_a_run_waiting_on_a_new_dest_that_a_failed_run_removed_makes_it_again(server, tmp_path):
    """Two first runs into one new --dest at once: the first failed (here a URL the server does not have) and
    removed the folder it had made, while the second waited on its lock; the second then failed with 'cannot
    write in --dest' (running it again worked). It now makes the folder again and fetches."""
    server.delay = 1.0  # the first run holds the lock this long, then gets a 404
    (tmp_path / NAME).write_bytes(pets_zip())
    dest, results = tmp_path / "data" / "new", {}

    def run(key, url):
        try:
            results[key] = fetch_data(cfg(dest, url)).unpacked
        except Exception as e:  # the test reports it
            results[key] = f"{type(e).__name__}: {e}"

    first = threading.Thread(target=run, args=("first", server.url.replace(NAME, "typo.zip")))
    first.start()
    while not server.requests:  # the first holds the lock
        time.sleep(0.01)
    second = threading.Thread(target=run, args=("second", f"file://{tmp_path}/{NAME}"))
    second.start()
    first.join()
    second.join()
    assert "HTTP 404" in results["first"]
    assert results["second"] == str(dest / "PetImages")
    assert (dest / "PetImages" / "Cat" / "0.jpg").stat().st_size == 150_000


def test_a_run_refused_as_busy_never_removes_the_new_dest_the_other_run_holds(server, tmp_path, monkeypatch):
    """Two first runs into one new --dest at once, both finding it missing: the second, refused after waiting
    for the lock (the first still waiting for its server), removed the empty folder as one it had made, and
    the first, answered at last, failed with 'cannot write in --dest'."""
    from pipeline.data import moves

    monkeypatch.setattr(moves, "LOCK_WAIT_S", 0.3)
    server.delay = 2.0  # the first run holds the lock this long before any byte comes
    dest, results, looked = tmp_path / "new", {}, threading.Event()
    real = fetch.missing_folders

    def missing(folder):  # the second looks before the first makes the folder, then goes on once it holds it
        found = real(folder)
        if threading.current_thread().name == "second" and not looked.is_set():
            looked.set()
            while not server.requests:
                time.sleep(0.01)
        return found

    monkeypatch.setattr(fetch, "missing_folders", missing)

    def run():
        try:
            results[threading.current_thread().name] = fetch_data(cfg(dest, server.url)).unpacked
        except Exception as e:  # the test reports it
            results[threading.current_thread().name] = f"{type(e).__name__}: {e}"

    second = threading.Thread(target=run, name="second")
    second.start()
    looked.wait(5)
    first = threading.Thread(target=run, name="first")
    first.start()
    first.join()
    second.join()
    assert results["second"].startswith("FolderBusy: another fetch-data is downloading or unpacking into")
    assert results["first"] == str(dest / "PetImages")


def test_a_read_only_dest_is_one_line_not_a_bug(server, tmp_path, monkeypatch):
    """A --dest on a read-only file system (or without write permission) was 'unexpected OSError: [Errno 30]
    Read-only file system ... (a bug?)'."""
    import errno
    import pathlib

    def read_only(self, *a, **kw):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(pathlib.Path, "write_text", read_only)
    res = CliRunner().invoke(cli, ["-q", "fetch-data", "--dest", str(tmp_path), "--url", server.url])
    assert res.exit_code == 1 and res.output == f"Error: cannot write {tmp_path}: the file system is read-only\n"


def test_a_disk_filling_up_mid_download_is_said_at_once_not_retried_as_a_dropped_connection(server, tmp_path,
                                                                                            monkeypatch):
    """Another program filled the disk while the archive downloaded (the free space was checked at the start):
    the failed write was taken for a dropped connection, retried with waits (2 + 4 + 8 s by default), then
    'download interrupted ... ([Errno 28] No space left on device); run the same command again to resume'."""
    import builtins
    import errno

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fetch_download, "open", lambda *a, **kw: Full(builtins.open(*a, **kw)), raising=False)
    res = CliRunner().invoke(cli, ["-q", "fetch-data", "--dest", str(tmp_path), "--url", server.url])
    assert res.exit_code == 1 and res.output == f"Error: cannot write {tmp_path}: no space left on the device\n"
    assert server.requests == [None] and (tmp_path / f"{NAME}.part").is_file()  # kept: the next run resumes it


def other_version() -> bytes:
    """pets_zip's next upload: the same names and sizes (so the same archive size), other bytes."""
    rng = np.random.default_rng(7)
    new = make_zip({"PetImages/Cat/0.jpg": rng.bytes(150_000), "PetImages/Dog/0.jpg": rng.bytes(150_000),
                    "PetImages/Cat/Thumbs.db": b"THUMBS", "readme[1].txt": b"HELLO"})
    assert len(new) == len(pets_zip()) and new != pets_zip()
    return new


def if_ranges(server) -> list:
    return [h.get("If-Range") for h in server.request_headers]


@pytest.mark.parametrize("kind", ["etag", "weak", "modified"])
def test_a_file_replaced_on_the_server_is_downloaded_whole_not_spliced_onto_the_old_head(server, tmp_path, kind):
    """A resume sent Range alone: a new upload under the same URL (same size) gave the old file's head and the
    new one's tail, an archive that passed the size check. Now the first answer's validator goes as If-Range."""
    server.validators, server.drops = kind, 1
    with pytest.raises(PipelineError, match="run the same command again to resume"):
        fetch_data(cfg(tmp_path, server.url, retries=0))
    server.files[NAME] = new = other_version()
    server.modified['"' + hashlib.sha256(new).hexdigest()[:16] + '"'] = "Wed, 02 Dec 2020 10:00:00 GMT"
    result = fetch_data(cfg(tmp_path, server.url))
    assert (tmp_path / NAME).read_bytes() == new and result.unpacked_now
    assert (tmp_path / "PetImages" / "Cat" / "Thumbs.db").read_bytes() == b"THUMBS"
    half = len(new) // 2
    assert server.requests == [None, f"bytes={half}-"]
    first = validators(server, pets_zip())
    assert if_ranges(server) == [None, first["ETag"] if kind == "etag" else first["Last-Modified"]]


def test_every_resume_sends_the_validator_and_a_weak_etag_never(server, tmp_path):
    """The retries inside one run and the next run's resume all send If-Range; with a weak ETag (W/...: not
    allowed in If-Range) the Last-Modified goes instead."""
    server.drops = 2
    with pytest.raises(PipelineError, match="run the same command again to resume"):
        fetch_data(cfg(tmp_path, server.url, retries=1))
    fetch_data(cfg(tmp_path, server.url))
    assert (tmp_path / NAME).read_bytes() == server.files[NAME]
    tag = validators(server, server.files[NAME])["ETag"]
    assert if_ranges(server) == [None, tag, tag] and server.requests[0] is None and None not in server.requests[1:]

    weak = tmp_path / "weak"
    server.validators, server.drops, server.request_headers = "weak", 1, []
    fetch_data(cfg(weak, server.url, retries=1))
    assert (weak / NAME).read_bytes() == server.files[NAME] and if_ranges(server) == [None, LONG_AGO]


@pytest.mark.parametrize("kind", ["none", "now"])
def test_a_resume_without_a_validator_goes_on_and_says_so_once(server, tmp_path, caplog, kind):
    """No ETag and no Last-Modified (or one of the answer's own second, which a rewrite within that second
    would keep): the resumed bytes cannot be checked, so the run says it, once however many resumes."""
    server.validators, server.drops = kind, 2
    with caplog.at_level(logging.WARNING, logger="pipeline.data.fetch"):
        fetch_data(cfg(tmp_path, server.url, retries=2))
    assert (tmp_path / NAME).read_bytes() == server.files[NAME] and len(server.requests) == 3
    assert if_ranges(server) == [None, None, None]
    unchecked = [r.getMessage() for r in caplog.records if "without a validator" in r.getMessage()]
    assert len(unchecked) == 1 and "delete the .part" in unchecked[0]


def test_a_part_begun_by_an_older_fetch_data_resumes_with_a_warning(server, tmp_path, caplog):
    """Its record holds the URL and no validator: resumed as before (nothing to send), and said."""
    half = len(server.files[NAME]) // 2
    (tmp_path / f"{NAME}.part").write_bytes(server.files[NAME][:half])
    (tmp_path / f".{NAME}.url").write_text(json.dumps({"url": server.url}))
    with caplog.at_level(logging.WARNING, logger="pipeline.data.fetch"):
        fetch_data(cfg(tmp_path, server.url))
    assert (tmp_path / NAME).read_bytes() == server.files[NAME]
    assert server.requests == [f"bytes={half}-"] and if_ranges(server) == [None]
    assert "without a validator" in caplog.text


@pytest.mark.parametrize("kind, new", [("etag", other_version), ("weak", other_version),
                                       ("none", lambda: other_version() + b"-a larger upload")])
def test_a_206_of_another_file_starts_the_download_over(server, tmp_path, caplog, kind, new):
    """A server that honours Range but ignores If-Range (or a resume with no validator to send) answered 206
    with the new upload's tail: its own ETag or Last-Modified, or its size, now tell, and the .part starts over."""
    server.validators, server.drops, server.ignore_if_range = kind, 1, True
    with pytest.raises(PipelineError, match="run the same command again to resume"):
        fetch_data(cfg(tmp_path, server.url, retries=0))
    server.files[NAME] = data = new()
    server.modified['"' + hashlib.sha256(data).hexdigest()[:16] + '"'] = "Wed, 02 Dec 2020 10:00:00 GMT"
    with caplog.at_level(logging.WARNING, logger="pipeline.data.fetch"):
        fetch_data(cfg(tmp_path, server.url))
    assert (tmp_path / NAME).read_bytes() == data
    half = len(pets_zip()) // 2
    assert server.requests == [None, f"bytes={half}-", None]
    assert f"{NAME} changed on the server since {NAME}.part was begun (" in caplog.text


def test_a_download_started_over_counts_the_part_it_empties_as_room(server, tmp_path, monkeypatch):
    """The file changed on the server: the whole new one needs its size less the .part's, which is emptied
    first (it was refused as if both had to fit, on a disk with room for the archive)."""
    server.drops = 1
    with pytest.raises(PipelineError, match="run the same command again to resume"):
        fetch_data(cfg(tmp_path, server.url, retries=0))
    server.files[NAME] = new = other_version()
    small_disk(monkeypatch, len(new) - len(new) // 2 + 1000)  # room for the archive, not for it and the .part
    download(cfg(tmp_path, server.url), tmp_path / NAME)
    assert (tmp_path / NAME).read_bytes() == new


def test_a_last_modified_in_minus_zero_zone_is_the_same_date_as_in_gmt():
    """A Last-Modified recorded as '... -0000' parsed naive and the server's '... GMT' aware: naive never equals
    aware, so an unchanged file was taken as replaced and downloaded again whole."""
    from types import SimpleNamespace

    from pipeline.data.fetch import replaced_since

    def answer(last_modified):
        return SimpleNamespace(status=206, headers={"Last-Modified": last_modified,
                                                    "Content-Range": "bytes 50-99/100"})

    then = "Wed, 02 Dec 2026 10:00:00 -0000"
    assert replaced_since(answer("Wed, 02 Dec 2026 10:00:00 GMT"), then, 100) is None
    assert "Last-Modified" in replaced_since(answer("Wed, 02 Dec 2026 10:00:01 GMT"), then, 100)


# -- --sha256 ----------------------------------------------------------------------------------
def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_an_archive_of_the_expected_sha256_is_unpacked(server, tmp_path):
    result = fetch_data(cfg(tmp_path, server.url, sha256=sha(server.files[NAME]).upper()))
    assert result.unpacked == str(tmp_path / "PetImages") and (tmp_path / "PetImages" / "Cat" / "0.jpg").is_file()


def test_a_download_of_another_sha256_is_kept_aside_never_unpacked(server, tmp_path):
    """There was no way to pin the archive: a damaged or swapped download was unpacked as the data."""
    wrong = "ab" * 32
    got = sha(server.files[NAME])
    r = CliRunner().invoke(cli, ["-q", "fetch-data", "--dest", str(tmp_path), "--url", server.url, "--sha256", wrong])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
    assert f"{NAME}'s SHA-256 is {got}, not {wrong} (--sha256): not unpacked" in r.output
    aside = tmp_path / f"{NAME}.sha256-{got[:16]}"
    assert f"kept as {aside}" in r.output and aside.read_bytes() == server.files[NAME]
    assert not (tmp_path / NAME).exists() and not (tmp_path / "PetImages").exists()
    assert not list(tmp_path.glob(".*.unpack*"))
    fetch_data(cfg(tmp_path, server.url, sha256=got))  # the next run downloads it anew
    assert server.requests == [None, None] and (tmp_path / "PetImages" / "Cat" / "0.jpg").is_file()


def test_an_archive_already_in_dest_is_checked_on_a_rerun(tmp_path):
    """An archive put there by hand, or unpacked by a run without --sha256: the digest is checked all the same,
    and a mismatch forgets the earlier unpack (the next archive is unpacked, not taken for done)."""
    data = pets_zip()
    (tmp_path / NAME).write_bytes(data)
    fetch_data(cfg(tmp_path, closed_port_url()))
    with pytest.raises(PipelineError, match=rf"already in dest, and is kept as .*; {tmp_path / 'PetImages'} was "
                                            "unpacked from it by an earlier run: check it"):
        fetch_data(cfg(tmp_path, closed_port_url(), sha256="0" * 64))
    assert (tmp_path / f"{NAME}.sha256-{sha(data)[:16]}").read_bytes() == data
    assert not (tmp_path / f".{NAME}.unpacked").exists() and (tmp_path / "PetImages" / "Cat" / "0.jpg").is_file()


def test_a_mismatching_file_the_url_names_is_left_where_it_is(tmp_path):
    (tmp_path / NAME).write_bytes(pets_zip())
    with pytest.raises(PipelineError, match="it is the file url names, left where it is"):
        fetch_data(cfg(tmp_path, f"file://{tmp_path}/{NAME}", sha256="0" * 64))
    assert (tmp_path / NAME).read_bytes() == pets_zip() and not (tmp_path / "PetImages").exists()


@pytest.mark.parametrize("value", ["abc", "g" * 64, "", "0" * 63 + " x"])
def test_a_sha256_that_is_no_digest_is_a_usage_error(tmp_path, value):
    r = CliRunner().invoke(cli, ["fetch-data", "--dest", str(tmp_path / "d"), "--url", closed_port_url(),
                                 "--sha256", value])
    assert r.exit_code == 2 and r.output == (f"Error: --sha256 {value!r} is not a SHA-256 digest: give its 64 hex "
                                             "digits (as sha256sum ARCHIVE prints them)\n"), r.output
    assert not (tmp_path / "d").exists()


# -- empty archives --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["zip", "tar", "tar.gz", "dirs", "macos"])
def test_an_archive_without_files_is_refused_and_leaves_nothing_unpacked(tmp_path, kind):
    """An empty zip (or a tar of empty folders, a zip of only __MACOSX) reported success, 'unpacked to DEST'."""
    archive = tmp_path / f"e.{'zip' if kind in ('zip', 'macos') else kind if kind != 'dirs' else 'tar'}"
    if kind == "zip":
        zipfile.ZipFile(archive, "w").close()
    elif kind == "macos":
        archive.write_bytes(make_zip({"__MACOSX/._x.jpg": b"fork", ".DS_Store": b"x"}))
    else:
        with tarfile.open(archive, "w:gz" if kind == "tar.gz" else "w") as t:
            if kind == "dirs":
                t.addfile(*dir_member("P")), t.addfile(*dir_member("P/Cat"))
    dest = tmp_path / "d"
    r = CliRunner().invoke(cli, ["-q", "fetch-data", "--dest", str(dest), "--url", f"file://{archive}"])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
    assert f"{dest / archive.name} " in r.output
    assert ": no images to unpack; is --url the archive you meant?" in r.output
    assert sorted(p.name for p in dest.iterdir()) == sorted([archive.name, f".{archive.name}.url"])


def test_an_empty_file_is_named_as_one(tmp_path):
    (tmp_path / NAME).write_bytes(b"")
    with pytest.raises(PipelineError, match=r"is an empty file \(0 bytes\), not an archive"):
        fetch_data(cfg(tmp_path, closed_port_url()))


def test_an_archive_of_archives_says_how_to_unpack_each(tmp_path, caplog):
    (tmp_path / NAME).write_bytes(make_zip({"train.zip": pets_zip(), "test.zip": pets_zip()}))
    with caplog.at_level(logging.WARNING):
        fetch_data(cfg(tmp_path, closed_port_url()))
    assert f"{NAME} holds no images but 2 archives (train.zip, test.zip): unpack each with fetch-data " \
           f"url=file://{tmp_path}/train.zip dest=DIR" in caplog.text


# -- Retry-After -----------------------------------------------------------------------------------
@pytest.fixture
def waits(monkeypatch):
    """The waits fetch-data sleeps (time.sleep is the one module's: the server's sleep(0) left out)."""
    slept = []
    monkeypatch.setattr(fetch_download.time, "sleep", lambda s: slept.append(s) if s else None)
    return slept


def test_a_busy_servers_retry_after_is_waited_and_said(server, tmp_path, waits, caplog):
    """Retry-After was ignored: asked again 0 s later (retry_wait), as a rate limit forbids."""
    soon = formatdate(time.time() + 30, usegmt=True)
    server.busy = [(503, {"Retry-After": "7"}), (429, {"Retry-After": soon})]
    with caplog.at_level(logging.WARNING):
        fetch_data(cfg(tmp_path, server.url, retries=3))
    assert (tmp_path / NAME).read_bytes() == server.files[NAME] and len(server.requests) == 3
    assert waits[0] == 7 and 28 <= waits[1] <= 31 and len(waits) == 2, waits
    assert "the server answered HTTP 503 Service Unavailable, asking to wait 7 s (Retry-After); asking again in " \
           "7 s" in caplog.text


def test_a_retry_after_past_the_bound_stops_at_once_saying_when_to_run_again(server, tmp_path, waits):
    server.busy = [(503, {"Retry-After": "86400"})]
    with pytest.raises(PipelineError) as e:
        fetch_data(cfg(tmp_path, server.url, retries=3))
    assert str(e.value).startswith(f"cannot download {server.url}: the server answered HTTP 503 Service Unavailable, "
                                   "asking to wait 24.0 h (Retry-After), longer than fetch-data waits (5 min); run "
                                   "this again after ")
    assert waits == [] and len(server.requests) == 1


@pytest.mark.parametrize("value", ["soon", "-5", "", "1.5"])
def test_a_retry_after_that_says_nothing_usable_keeps_the_own_waits(server, tmp_path, waits, value):
    server.busy = [(503, {"Retry-After": value})]
    fetch_data(FetchConfig(dest=str(tmp_path), url=server.url, timeout=5, retry_wait=0.25, retries=1))
    assert waits == [0.25] and (tmp_path / NAME).read_bytes() == server.files[NAME]


# -- signed links ----------------------------------------------------------------------------------
def signed(url: str, sig: str, when: str = "20261207T100000Z") -> str:
    return f"{url}?X-Amz-Date={when}&X-Amz-Expires=3600&X-Amz-Signature={sig}"


def test_a_cut_off_download_resumes_from_a_link_signed_anew(server, tmp_path, caplog):
    """A presigned S3 link expires: the same one answers 403 ('cannot download ...: HTTP 403 Forbidden', no
    word of why), and a new one for the same file was refused ('was partly fetched from ..., not ...'), whose
    --overwrite threw the .part away."""
    first, second = signed(server.url, "aaa"), signed(server.url, "bbb")
    server.drops = 1
    with pytest.raises(PipelineError, match="run the same command again to resume"):
        fetch_data(cfg(tmp_path, first, retries=0))
    half = len(server.files[NAME]) // 2
    server.expired = {first.partition("?")[2]}
    with pytest.raises(PipelineError) as e:
        fetch_data(cfg(tmp_path, first))
    assert str(e.value) == (f"cannot download {first}: the server answered HTTP 403 Forbidden; the link expired at "
                            "2026-12-07 11:00 UTC (a signed link): get a new one and run this again with it; the "
                            f"{half} bytes of {NAME}.part are kept, and resumed from the new link")
    assert (tmp_path / f"{NAME}.part").stat().st_size == half
    with caplog.at_level(logging.WARNING):
        fetch_data(cfg(tmp_path, second))
    assert (tmp_path / NAME).read_bytes() == server.files[NAME]
    assert server.requests[-1] == f"bytes={half}-" and "signed otherwise (an expired link made anew)" in caplog.text
    assert server.request_headers[-1]["If-Range"]  # the file is still checked to be the one begun


@pytest.mark.parametrize("first, second", [("?X-Amz-Signature=a", "?X-Amz-Signature=b"),
                                           ("?v=2&token=a", "?token=b&v=2"),
                                           ("?sv=1&se=2026-12-07T10%3A00Z&sig=a", "?sv=1&se=2026-12-08T10%3A00Z&sig=b"),
                                           ("?Expires=1&Signature=a&Key-Pair-Id=k",
                                            "?Expires=2&Signature=b&Key-Pair-Id=k")])
def test_a_complete_archive_of_a_link_signed_anew_is_not_fetched_again(server, tmp_path, first, second):
    fetch_data(cfg(tmp_path, server.url + first))
    result = fetch_data(cfg(tmp_path, server.url + second))
    assert result.downloaded is False and server.requests == [None]


def test_a_link_signed_anew_for_a_file_replaced_meanwhile_starts_over(server, tmp_path):
    server.drops = 1
    with pytest.raises(PipelineError):
        fetch_data(cfg(tmp_path, signed(server.url, "aaa"), retries=0))
    server.files[NAME] = new = other_version()
    fetch_data(cfg(tmp_path, signed(server.url, "bbb")))
    assert (tmp_path / NAME).read_bytes() == new


@pytest.mark.parametrize("other", ["?id=2&X-Amz-Signature=b", "?st=2"])
def test_a_url_differing_in_more_than_its_signature_is_still_refused(server, tmp_path, other):
    server.drops = 1
    with pytest.raises(PipelineError):
        fetch_data(cfg(tmp_path, server.url + "?id=1&X-Amz-Signature=a", retries=0))
    with pytest.raises(UsageError, match="was partly fetched from"):
        fetch_data(cfg(tmp_path, server.url + other))


def test_a_403_on_a_resume_keeps_the_part_and_says_so(server, tmp_path):
    server.drops = 1
    with pytest.raises(PipelineError):
        fetch_data(cfg(tmp_path, server.url, retries=0))
    server.busy = [403]
    with pytest.raises(PipelineError, match=r"HTTP 403 Forbidden; the \d+ bytes of pets.zip.part are kept, and "
                                            r"resumed once the server allows it \(the same command\)$"):
        fetch_data(cfg(tmp_path, server.url))
    assert (tmp_path / f"{NAME}.part").is_file()


# -- --dest edge cases, odd entries ----------------------------------------------------------------
@pytest.mark.parametrize("place", [NAME, f"{NAME}.part"])
def test_a_folder_at_the_archives_place_is_refused_before_downloading(server, tmp_path, place):
    """It downloaded the whole archive, then failed to rename it ('[Errno 21] Is a directory'), or (a folder
    at the .part's place) said 'the server does not resume downloads' and failed the same way."""
    (tmp_path / place).mkdir()
    r = CliRunner().invoke(cli, ["fetch-data", "--dest", str(tmp_path), "--url", server.url])
    assert r.exit_code == 2 and r.output.startswith(f"Error: {tmp_path / place} is a folder, where fetch-data keeps ")
    assert server.requests == [] and (tmp_path / place).is_dir()


def test_an_empty_dest_is_a_usage_error_not_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / NAME).write_bytes(pets_zip())
    r = CliRunner().invoke(cli, ["fetch-data", "--dest", "", "--url", f"file://{tmp_path}/{NAME}"])
    assert r.exit_code == 2 and "'' is an empty name; give a folder" in r.output, r.output
    with pytest.raises(UsageError, match="dest '' is an empty name"):
        from pipeline import api
        api.fetch_data(dest="", url=f"file://{tmp_path}/{NAME}")
    assert not (tmp_path / "PetImages").exists()


@pytest.mark.parametrize("name", ["P/a/" + "x" * 300 + ".jpg", "P/" + "d" * 300 + "/0.jpg",
                                  "/".join(["P"] + ["d" * 200] * 21 + ["0.jpg"])])
def test_an_entry_name_too_long_for_the_file_system_is_refused_before_anything_is_written(tmp_path, name):
    """It failed halfway ('File name too long'), saying the same command would finish the unpack: it never could."""
    (tmp_path / NAME).write_bytes(make_zip({"P/b/0.jpg": b"ok", name: b"x"}))
    with pytest.raises(PipelineError, match=r"longer than the \d+ the file system (of .* )?allows; refusing to "
                                            r"unpack \(nothing was written\)"):
        fetch_data(cfg(tmp_path, closed_port_url()))
    assert not (tmp_path / "P").exists() and not list(tmp_path.glob(".*.unpacking"))


def test_a_reconnect_that_fails_once_after_a_drop_is_asked_again(server, tmp_path, monkeypatch):
    """A dropped connection was retried, but a failed reconnect (Wi-Fi switching) ended the run at once with
    'offline? Download it by hand...', the retries left unused."""
    import urllib.error
    import urllib.request

    real, calls = urllib.request.urlopen, []

    def flaky(req, timeout):
        calls.append(req.get_header("Range"))
        if len(calls) == 2:
            raise urllib.error.URLError(ConnectionRefusedError(111, "Connection refused"))
        return real(req, timeout=timeout)

    monkeypatch.setattr(fetch_download.urllib.request, "urlopen", flaky)
    server.drops = 1
    fetch_data(cfg(tmp_path, server.url, retries=2))
    half = len(server.files[NAME]) // 2
    assert (tmp_path / NAME).read_bytes() == server.files[NAME]
    assert calls == [None, f"bytes={half}-", f"bytes={half}-"]


def test_offline_with_a_part_says_it_is_kept_and_resumed_not_to_download_by_hand(tmp_path):
    (tmp_path / f"{NAME}.part").write_bytes(b"x" * 1000)
    with pytest.raises(PipelineError) as e:
        fetch_data(cfg(tmp_path, closed_port_url()))
    assert "offline? The 1000 bytes of pets.zip.part are kept: run the same command again to resume" in str(e.value)
    assert "by hand" not in str(e.value) and (tmp_path / f"{NAME}.part").stat().st_size == 1000


@pytest.mark.parametrize("mode", ["w:gz", "w:bz2", "w:xz"])
def test_a_compressed_tar_cut_off_is_one_line_not_a_bug(tmp_path, mode):
    """A .tar.gz cut in its first block (a download of unknown size stopped early) failed as 'unexpected EOFError:
    Compressed file ended before the end-of-stream marker was reached (a bug? ...)' (a .tar.bz2 or .tar.xz: 'neither
    a zip nor a tar archive')."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as t:
        info, data = file_member("P/a/0.jpg", np.random.default_rng(0).bytes(50_000))
        t.addfile(info, io.BytesIO(data))
    (tmp_path / "pets.tar").write_bytes(buf.getvalue()[:30])
    r = CliRunner().invoke(cli, ["-q", "fetch-data", "--dest", str(tmp_path), "--url",
                                 closed_port_url().replace(NAME, "pets.tar")])
    assert r.exit_code == 1 and "cut off or damaged" in r.output and "; delete it and download again" in r.output
    assert len(r.output.strip().splitlines()) == 1 and "bug" not in r.output, r.output


def test_a_zip_cut_off_is_named_as_one(tmp_path):
    (tmp_path / NAME).write_bytes(pets_zip()[:100_000])
    with pytest.raises(PipelineError, match="is a zip archive cut off before its end"):
        fetch_data(cfg(tmp_path, closed_port_url()))


def test_a_url_with_spaces_or_accents_is_sent_encoded_as_a_browser_sends_it(server, tmp_path):
    """A URL copied from a browser's address bar ('.../données v2.zip') failed as 'unexpected UnicodeEncodeError
    ... (a bug?)', a space as 'URL can't contain control characters ...; offline?'."""
    server.files["donn%C3%A9es%20v2.zip"] = data = pets_zip()
    url = server.url.replace(NAME, "données v2.zip?v=été")
    result = fetch_data(cfg(tmp_path, url))
    assert (tmp_path / "données v2.zip").read_bytes() == data and result.url == url
    assert fetch.request_url("http://bücher.example/a%20b/c d.zip?q=1 2") == \
        "http://xn--bcher-kva.example/a%20b/c%20d.zip?q=1%202"


def test_a_url_without_a_host_is_a_usage_error_not_offline(tmp_path):
    r = CliRunner().invoke(cli, ["fetch-data", "--dest", str(tmp_path / "d"), "--url", "https:///a.zip"])
    assert r.exit_code == 2 and r.output == "Error: --url 'https:///a.zip' names no host\n"


def test_an_untrusted_certificate_is_named_as_such_not_offline(tmp_path, monkeypatch):
    """A proxy inspecting HTTPS (or python.org's Python on macOS without its certificates) said 'offline?'."""
    import ssl
    import urllib.error

    def untrusted(req, timeout):
        raise urllib.error.URLError(ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate "
                                                                    "verify failed: self-signed certificate"))

    monkeypatch.setattr(fetch_download.urllib.request, "urlopen", untrusted)
    with pytest.raises(PipelineError) as e:
        fetch_data(cfg(tmp_path, "https://example.com/pets.zip"))
    assert "its server's certificate cannot be verified here (" in str(e.value) and "SSL_CERT_FILE" in str(e.value)
    assert "offline" not in str(e.value)


@pytest.mark.parametrize("pax, mtime", [({}, 2 ** 70), ({}, -2 ** 70), ({"mtime": "nan"}, 0)])
def test_a_tar_entry_of_an_impossible_time_unpacks_with_the_present_one(tmp_path, caplog, pax, mtime):
    """Unpacking stopped halfway at it: 'unexpected OverflowError: timestamp out of range for platform time_t'
    (ValueError for a pax NaN), '(a bug?)'."""
    with tarfile.open(tmp_path / "pets.tar", "w", format=tarfile.PAX_FORMAT if pax else tarfile.GNU_FORMAT) as t:
        for name in ("P/a/0.jpg", "P/b/0.jpg"):
            info, data = file_member(name, b"x")
            info.mtime, info.pax_headers = mtime, pax
            t.addfile(info, io.BytesIO(data))
    with caplog.at_level(logging.WARNING):
        fetch_data(cfg(tmp_path, closed_port_url().replace(NAME, "pets.tar")))
    assert (tmp_path / "P" / "b" / "0.jpg").read_bytes() == b"x"
    assert abs((tmp_path / "P" / "b" / "0.jpg").stat().st_mtime - time.time()) < 60
    assert "pets.tar: 2 entries carry a modification time no file can have (P/a/0.jpg, P/b/0.jpg)" in caplog.text


def test_a_server_sending_other_bytes_than_asked_starts_the_download_over(server, tmp_path, caplog):
    """'asked the server for bytes from N, it sent from 0': a dead end, the same command failing each time."""
    server.drops = 1
    with pytest.raises(PipelineError):
        fetch_data(cfg(tmp_path, server.url, retries=0))
    server.range_from_zero = True
    with caplog.at_level(logging.WARNING):
        fetch_data(cfg(tmp_path, server.url))
    half = len(server.files[NAME]) // 2
    assert (tmp_path / NAME).read_bytes() == server.files[NAME] and server.requests[1:] == [f"bytes={half}-", None]
    assert f"asked the server for {NAME} from byte {half}, it sent from byte 0; downloading it whole again" in \
        caplog.text


def test_a_part_longer_than_the_servers_file_is_downloaded_whole_again(server, tmp_path, caplog):
    """It said 'pets.zip.part holds N bytes but the server's file has M; delete the .part file and run again'."""
    size = len(server.files[NAME])
    (tmp_path / f"{NAME}.part").write_bytes(b"x" * (size + 10))
    with caplog.at_level(logging.WARNING):
        fetch_data(cfg(tmp_path, server.url))
    assert (tmp_path / NAME).read_bytes() == server.files[NAME] and server.requests == [f"bytes={size + 10}-", None]
    assert f"{NAME}.part holds {size + 10} bytes, more than the server's file ({size}); downloading it whole" in \
        caplog.text


def test_a_mismatching_archive_that_cannot_be_moved_aside_is_one_line(tmp_path, monkeypatch):
    (tmp_path / NAME).write_bytes(pets_zip())

    def refused(a, b):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(fetch.os, "replace", refused)
    r = CliRunner().invoke(cli, ["-q", "fetch-data", "--dest", str(tmp_path), "--url", closed_port_url(),
                                 "--sha256", "0" * 64])
    assert r.exit_code == 1 and "it could not be moved aside (Permission denied): move " in r.output, r.output
    assert (tmp_path / NAME).is_file() and not (tmp_path / "PetImages").exists()


def test_a_url_with_a_user_and_password_logs_in_as_curl_does(server, tmp_path):
    """'http://user:pw@host/x.zip' sent 'user:pw@host' as the host name: 'Name or service not known; offline?'."""
    import base64

    server.auth = "Basic " + base64.b64encode(b"ann:p@ss w").decode()
    fetch_data(cfg(tmp_path, server.url.replace("http://", "http://ann:p%40ss%20w@")))
    assert (tmp_path / NAME).read_bytes() == server.files[NAME]
    assert [h.get("Authorization") for h in server.request_headers] == [None, server.auth]
    assert fetch.request_url("http://ann:pw@[::1]:8080/a b.zip") == "http://[::1]:8080/a%20b.zip"


def test_a_wrong_password_is_the_servers_401(server, tmp_path):
    server.auth = "Basic nope"
    with pytest.raises(PipelineError, match="the server answered HTTP 401 Unauthorized"):
        fetch_data(cfg(tmp_path, server.url.replace("http://", "http://ann:wrong@")))


def test_a_path_given_for_a_url_is_answered_with_its_file_url(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / NAME).write_bytes(pets_zip())
    for given in (NAME, str(tmp_path / NAME)):
        r = CliRunner().invoke(cli, ["fetch-data", "--dest", "d", "--url", given])
        assert r.exit_code == 2 and r.output == (f"Error: --url {given!r} must be a URL of scheme http, https, file "
                                                 f"(the file there: --url {(tmp_path / NAME).as_uri()})\n"), r.output
    r = CliRunner().invoke(cli, ["fetch-data", "--dest", "d", "--url", "a\0b"])
    assert r.exit_code == 2 and "must be a URL of scheme" in r.output


@pytest.mark.parametrize("url", [f"file:{NAME}", f"file://{NAME}", "file://host/tmp/pets.zip"])
def test_a_file_url_of_no_absolute_path_is_a_usage_error(tmp_path, monkeypatch, url):
    """'file:pets.zip' failed as 'No such file or directory: /pets.zip; offline?', 'file://x/pets.zip' read
    /pets.zip, whatever the host."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / NAME).write_bytes(pets_zip())
    r = CliRunner().invoke(cli, ["fetch-data", "--dest", "d", "--url", url])
    assert r.exit_code == 2 and r.output == (f"Error: --url {url!r} is not a file URL of an absolute path: write "
                                             "file:///ABSOLUTE/PATH (three slashes)\n"), r.output
    assert not (tmp_path / "d").exists()


def test_a_password_in_the_url_is_masked_in_messages(server, tmp_path):
    server.auth = "Basic nope"
    with pytest.raises(PipelineError) as e:
        fetch_data(cfg(tmp_path, server.url.replace("http://", "http://ann:s3cret@")))
    assert "s3cret" not in str(e.value) and "http://ann:***@127.0.0.1:" in str(e.value)
    assert fetch.shown_url("https://ghp_tok3n@host/x.zip") == "https://***@host/x.zip"  # a token as the user


def test_a_token_given_as_the_user_is_written_neither_to_disk_nor_to_the_result(server, tmp_path):
    import base64

    server.auth = "Basic " + base64.b64encode(b"ghp_tok3n:").decode()
    url = server.url.replace("http://", "http://ghp_tok3n@")
    result = fetch_data(cfg(tmp_path, url))
    assert result.url == server.url.replace("http://", "http://***@") and "tok3n" not in _on_disk(tmp_path)
    assert fetch_data(cfg(tmp_path, url)).downloaded is False and len(server.request_headers) == 2


def _on_disk(folder) -> str:
    return "".join(p.read_text(errors="replace") for p in folder.rglob("*") if p.is_file() and p.suffix != ".zip"
                   and not p.name.endswith(".part"))


def test_a_password_in_the_url_is_written_neither_to_disk_nor_to_json(server, tmp_path):
    """The .X.url record beside the archive, FetchResult.url and --json held 'http://ann:s3cret@...' as given."""
    import base64

    server.auth = "Basic " + base64.b64encode(b"ann:s3cret").decode()
    url = server.url.replace("http://", "http://ann:s3cret@")
    r = CliRunner().invoke(cli, ["-q", "fetch-data", "--dest", str(tmp_path), "--url", url, "--json"])
    assert r.exit_code == 0, r.output
    assert "s3cret" not in r.output and json.loads(r.stdout)["url"] == server.url.replace("http://", "http://ann:***@")
    assert "s3cret" not in _on_disk(tmp_path) and "ann:sha256-" in _on_disk(tmp_path)
    again = fetch_data(cfg(tmp_path, url))  # still known for the same URL: nothing fetched
    assert again.downloaded is False and again.url == shown_url(url) and len(server.request_headers) == 2
    with pytest.raises(UsageError, match=r"was fetched from http://ann:\*\*\*@127.*, not http://ann:\*\*\*@"):
        fetch_data(cfg(tmp_path, url.replace("s3cret", "other")))  # as before: another URL


def test_a_partial_download_with_a_password_resumes_without_it_on_disk(server, tmp_path):
    import base64

    server.auth, server.drops = "Basic " + base64.b64encode(b"ann:s3cret").decode(), 1
    url = server.url.replace("http://", "http://ann:s3cret@")
    with pytest.raises(PipelineError, match="run the same command again to resume"):
        fetch_data(cfg(tmp_path, url, retries=0))
    assert "s3cret" not in _on_disk(tmp_path) and (tmp_path / f"{NAME}.part").stat().st_size
    fetch_data(cfg(tmp_path, url))
    assert server.requests[-1] == f"bytes={len(server.files[NAME]) // 2}-"
    assert (tmp_path / NAME).read_bytes() == server.files[NAME] and "s3cret" not in _on_disk(tmp_path)


@pytest.mark.parametrize("secret, url", [("s3cret", "http://ann:s3cret@{host}/" + NAME),
                                         ("zzsig", "http://{host}/" + NAME + "?v=1&X-Amz-Signature=zzsig")])
def test_an_older_record_holding_the_secret_is_understood_and_written_anew_without_it(server, tmp_path, secret, url):
    url = url.format(host=server.url.split("/")[2])
    (tmp_path / NAME).write_bytes(server.files[NAME])
    (tmp_path / f".{NAME}.url").write_text(json.dumps({"url": url, "bytes": len(server.files[NAME])}))
    result = fetch_data(cfg(tmp_path, url))
    assert result.downloaded is False and server.requests == []
    record = json.loads((tmp_path / f".{NAME}.url").read_text())
    assert secret not in json.dumps(record) and record["bytes"] == len(server.files[NAME])
    assert fetch_data(cfg(tmp_path, url)).downloaded is False and server.requests == []


def test_a_signed_links_signature_is_not_written_to_disk(server, tmp_path):
    first, second = signed(server.url, "aaasecret"), signed(server.url, "bbbsecret")
    fetch_data(cfg(tmp_path, first))
    assert "aaasecret" not in _on_disk(tmp_path) and "X-Amz-Signature=sha256-" in _on_disk(tmp_path)
    assert fetch_data(cfg(tmp_path, first)).downloaded is False and fetch_data(cfg(tmp_path, second)).downloaded \
        is False and server.requests == [None]
    with pytest.raises(UsageError, match="was fetched from"):  # another file, signed: still told apart
        fetch_data(cfg(tmp_path, signed(server.url.replace(NAME, "B/" + NAME), "aaasecret")))


def test_a_file_where_the_archive_needs_a_folder_is_refused_before_anything_is_written(tmp_path):
    """A zip without folder entries ('P/a/0.jpg') into a --dest holding a file 'P' stopped halfway, 'Not a
    directory', saying the same command would finish the unpack 'once this is fixed' (--overwrite too)."""
    (tmp_path / "P").write_text("mine")
    (tmp_path / NAME).write_bytes(make_zip({"P/a/0.jpg": b"x", "P/b/0.jpg": b"y"}))
    with pytest.raises(PipelineError, match=rf"^{tmp_path / 'P'} already exists as a file where the archive unpacks a "
                                            r"folder \('P/a/0.jpg' inside it\); move it away, or unpack over it"):
        fetch_data(cfg(tmp_path, closed_port_url()))
    assert (tmp_path / "P").read_text() == "mine" and not list(tmp_path.glob(".*.unpacking"))
    fetch_data(cfg(tmp_path, closed_port_url(), overwrite=True))
    assert (tmp_path / "P" / "b" / "0.jpg").read_bytes() == b"y"


def test_a_folder_where_the_archive_unpacks_a_file_is_never_removed_even_with_overwrite(tmp_path):
    """--overwrite got past the refusal, then stopped halfway: 'Is a directory', 'the same command finishes the
    unpack once this is fixed'."""
    (tmp_path / "P" / "a" / "0.jpg").mkdir(parents=True)
    (tmp_path / "P" / "a" / "0.jpg" / "mine.txt").write_text("mine")
    (tmp_path / NAME).write_bytes(make_zip({"P/a/0.jpg": b"x", "P/b/0.jpg": b"y"}))
    with pytest.raises(PipelineError, match=r"0.jpg is a folder where the archive unpacks a file, which even "
                                            r"overwrite=True never removes; move it away"):
        fetch_data(cfg(tmp_path, closed_port_url(), overwrite=True))
    assert (tmp_path / "P" / "a" / "0.jpg" / "mine.txt").read_text() == "mine"
    assert not (tmp_path / "P" / "b").exists()


def test_ctrl_c_during_a_download_says_the_bytes_so_far_are_kept(server, tmp_path, monkeypatch, caplog):
    """Ctrl-C said only 'interrupted': nothing said the .part was kept, nor that the same command resumes."""
    real = fetch_download._read
    reads = []

    def read(resp):
        reads.append(1)
        if len(reads) == 2:
            raise KeyboardInterrupt
        return real(resp)

    monkeypatch.setattr(fetch_download, "_read", read)
    monkeypatch.setattr(fetch_download, "CHUNK", 100_000)
    with caplog.at_level(logging.WARNING), pytest.raises(KeyboardInterrupt):
        fetch_data(cfg(tmp_path, server.url))
    assert (tmp_path / f"{NAME}.part").stat().st_size == 100_000
    assert f"100000 bytes of {NAME} kept in {tmp_path / NAME}.part; the same command resumes from them" in caplog.text
    monkeypatch.setattr(fetch_download, "_read", real)
    fetch_data(cfg(tmp_path, server.url))
    assert (tmp_path / NAME).read_bytes() == server.files[NAME] and server.requests[-1] == "bytes=100000-"


def test_an_archive_of_train_and_test_splits_says_which_folder_is_the_data(tmp_path, caplog):
    """'set/train/{cat,dog}', 'set/test/{cat,dog}': fetch-data named 'set' without a word, a data folder whose
    classes would be 'train' and 'test'."""
    (tmp_path / NAME).write_bytes(make_zip({n: b"photo" for n in ["set/train/cat/0.jpg", "set/train/dog/0.jpg",
                                                                  "set/test/cat/0.jpg", "set/test/dog/0.jpg"]}))
    with caplog.at_level(logging.WARNING):
        fetch_data(cfg(tmp_path, closed_port_url()))
    root = tmp_path / "set"
    assert f"{root} holds split folders (train, test), each of classes, not classes: give {root / 'train'} as " \
           f"data, and {root / 'test'} as fit-head's test_data" in caplog.text


def test_overwrite_unpacks_again_over_an_earlier_unpack(tmp_path):
    """A photo deleted (or edited) in the unpacked folder, then 'fetch-data --overwrite' to get it back: it said
    'already unpacked' and restored nothing."""
    (tmp_path / NAME).write_bytes(pets_zip())
    fetch_data(cfg(tmp_path, closed_port_url()))
    (tmp_path / "PetImages" / "Cat" / "0.jpg").unlink()
    (tmp_path / "PetImages" / "Dog" / "0.jpg").write_bytes(b"edited")
    assert fetch_data(cfg(tmp_path, closed_port_url())).unpacked_now is False  # without it: left alone
    assert not (tmp_path / "PetImages" / "Cat" / "0.jpg").exists()
    result = fetch_data(cfg(tmp_path, closed_port_url(), overwrite=True))
    assert result.unpacked_now is True and (tmp_path / "PetImages" / "Cat" / "0.jpg").stat().st_size == 150_000
    assert (tmp_path / "PetImages" / "Dog" / "0.jpg").stat().st_size == 150_000
