"""The fetch-data stage: download an archive (resuming a partial download) and unpack it safely.

The download streams to ``<dest>/<name>.part`` and is renamed to ``<name>`` only once its size is
checked, so an existing ``<name>`` is complete and is left alone without touching the network.
Every archive entry is checked before anything is written: none may land outside ``dest``.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import logging
import lzma
import math
import os
import shutil
import ssl
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path, PurePosixPath

from ..config import FetchConfig, Placeholder, flag_text, option_text, option_value
from ..errors import DiskFull, PipelineError, UsageError
from ..files import check_output, disk_error, disk_reason, json_text, plain_name, same_file
from .folders import IMAGE_EXTENSIONS, is_image_name, is_os_file, is_skipped_folder
from .moves import folder_lock, link_on_the_way

log = logging.getLogger(__name__)

#: Microsoft's Kaggle cats-and-dogs archive (786 MB; unpacks to PetImages/Cat and PetImages/Dog).
URL_SCHEMES = ("http", "https", "file")
CHUNK = 1 << 20
#: Room a download of unknown size leaves free: it stops there (the .part kept) rather than fill the disk.
UNKNOWN_SIZE_MARGIN = 64 << 20


def archive_name(url: str) -> str:
    """The archive's file name in dest: the URL path's last part, decoded, and only a plain name
    (a decoded '%2F' or '..' would otherwise write the archive outside dest)."""
    try:
        parts = urllib.parse.urlsplit(url)
        _ = parts.port  # parsed on access: 'http://h:99999/x.zip'
    except ValueError as e:  # 'http://[::1': an unclosed IPv6 bracket, a bad port
        raise UsageError(f"{option_value('url', url)} is not a valid URL ({e})") from None
    if parts.scheme not in URL_SCHEMES:
        try:  # a path given for a URL ('data/pets.zip', 'C:\\pets.zip'): its file URL is said
            here = Path(url).resolve() if url and Path(url).is_file() else None
        except (OSError, ValueError):  # a NUL in it
            here = None
        hint = f" (the file there: {option_text('url', Placeholder(here.as_uri()))})" if here else ""
        raise UsageError(f"{option_value('url', url)} must be a URL of scheme {', '.join(URL_SCHEMES)}{hint}")
    if parts.scheme == "file" and (parts.netloc not in ("", "localhost") or not parts.path.startswith("/")):
        # 'file://data/pets.zip' read /pets.zip, 'file:pets.zip' failed as '...; offline?'
        raise UsageError(f"{option_value('url', url)} is not a file URL of an absolute path: write "
                         f"{Placeholder('file:///ABSOLUTE/PATH')} (three slashes)")
    if parts.scheme != "file" and not parts.hostname:  # 'https:///x.zip': it said 'no host given; offline?'
        raise UsageError(f"{option_value('url', url)} names no host")
    name = PurePosixPath(parts.path).name
    if not name or name in (".", ".."):
        raise UsageError(f"{option_value('url', url)} does not end with a file name")
    return plain_name(urllib.parse.unquote(name), f"{option_value('url', url)} names the archive")


@dataclass(frozen=True)
class FetchResult:
    """fetch-data's answer: the archive, whether it was downloaded now, and the folder it unpacked to."""

    archive: str
    bytes: int  # the archive's size
    downloaded: bool  # False: the archive was already complete
    unpacked: str  # the folder unpacked (the one to pass as --data)
    unpacked_now: bool  # False: it had been unpacked before
    url: str


def fetch_data(cfg: FetchConfig) -> FetchResult:
    """Download cfg.url into cfg.dest (unless already complete) and unpack it there (unless done)."""
    name = archive_name(cfg.url)
    expected = expected_sha256(cfg.sha256)
    source = local_source(cfg.url)
    if source is not None and not source.is_file() and not (Path(cfg.dest) / name).is_file():  # not "offline?"
        raise UsageError(f"{option_value('url', cfg.url)} names no file: {str(source)!r} does not exist or is not a "
                         "file")
    dest = check_output(cfg.dest, what="--dest", folder=True)  # the URL is all it reads
    archive = dest / name
    busy = f"another fetch-data is downloading or unpacking into {dest}; run this again when it has finished"
    made: list[Path] = []
    with dest_lock(dest, busy, made):  # two at once appended one .part twice, or unpacked over each other
        try:
            check_places(cfg, archive)
            check_source(cfg, archive, source)
            downloaded = not archive.is_file()
            if downloaded:
                try:
                    download(cfg, archive)
                    _source_record(archive).write_text(json_text({**url_record(cfg.url),
                                                                  "bytes": archive.stat().st_size}))
                except OSError as e:  # a read-only or full --dest (the network's errors are PipelineErrors already)
                    raise disk_error(e, dest) or PipelineError(f"cannot write in {option_text('dest')} {dest}: "
                                                               f"{e}") from None
            else:
                log.info("archive already complete: %s", archive)
            if expected is not None:  # before anything is unpacked, and on every run: a file put there by hand too
                check_sha256(archive, expected, downloaded, keep=source)
            unpacked, fresh = unpack(archive, dest, overwrite=cfg.overwrite, keep=source)
            warn_splits(unpacked)
        except BaseException:
            remove_if_empty(made)  # under the lock: a run waiting for it finds the folder gone, and makes it again
            raise
    return FetchResult(archive=str(archive), bytes=archive.stat().st_size, downloaded=downloaded,
                       unpacked=str(unpacked), unpacked_now=fresh, url=shown_url(cfg.url))


def expected_sha256(value) -> str | None:
    """--sha256 as 64 lower-case hex digits (None: unchecked); a UsageError naming any other value."""
    if value is None:
        return None
    digest = value.strip().lower() if isinstance(value, str) else ""
    digest = digest.removeprefix("sha256:")  # as some manifests write it
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise UsageError(f"{option_value('sha256', value)} is not a SHA-256 digest: give its 64 hex digits (as "
                         "sha256sum ARCHIVE prints them)")
    return digest


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_sha256(archive: Path, expected: str, downloaded: bool, keep: Path | None = None) -> None:
    """Refuse (PipelineError, before anything is unpacked) an archive whose SHA-256 is not ``expected``: it is
    moved aside to ``NAME.sha256-DIGEST`` (kept, never unpacked; the next run downloads the archive anew), unless
    it is the --url's own file (``keep``), which stays where it is. The record of an earlier unpack of it goes
    with it, so that the next archive is unpacked, not taken for done (the files it unpacked stay, and a new
    unpack over them is refused as any other conflict)."""
    try:
        got = file_sha256(archive)
    except OSError as e:
        raise PipelineError(f"cannot read {archive} to check its SHA-256: {e.strerror or e}") from None
    if got == expected:
        log.info("%s: SHA-256 as expected", archive.name)
        return
    mismatch = f"{archive.name}'s SHA-256 is {got}, not {expected} ({option_text('sha256')}): not unpacked"
    if keep is not None and same_file(archive, keep):
        raise PipelineError(f"{mismatch}; it is the file {option_text('url')} names, left where it is")
    aside = archive.with_name(f"{archive.name}.sha256-{got[:16]}")
    marker = archive.with_name(f".{archive.name}.unpacked")
    try:
        root = archive.parent / json.loads(marker.read_text())["root"]
    except (OSError, ValueError, KeyError, TypeError):
        root = None
    try:  # the record first: a run killed in between finds the archive unrecorded, and checks it again
        marker.unlink(missing_ok=True)
        os.replace(archive, aside)  # a file there already holds these very bytes (its name is their digest)
    except OSError as e:  # a read-only --dest: it stays, refused again by the next run
        raise PipelineError(f"{mismatch}; it could not be moved aside ({e.strerror or e}): move {archive} away "
                            "before running this again") from None
    how = "downloaded now (damaged on the way, or another file than the digest's?)" if downloaded else \
        "already in " + option_text("dest")
    earlier = f"; {root} was unpacked from it by an earlier run: check it" if root is not None else ""
    raise PipelineError(f"{mismatch}; it was {how}, and is kept as {aside}{earlier}; check {option_text('url')} and "
                        f"{option_text('sha256')}, and run again to download it anew")


@contextlib.contextmanager
def dest_lock(dest: Path, busy: str, made: list[Path]):
    """Make ``dest`` (adding the folders made to ``made``, deepest first) and hold its folder lock while inside.
    A run that failed while this one waited for the lock may have removed the folder it made (it was empty):
    the lock was then taken on a folder no longer there, so the folder is made again and locked anew."""
    for _ in range(5):
        made[:] = sorted(set(made) | set(missing_folders(dest)), key=lambda p: len(p.parts), reverse=True)
        try:
            dest.mkdir(parents=True, exist_ok=True)
        except FileNotFoundError:  # a parent removed meanwhile by a failed run
            continue
        except OSError as e:
            remove_if_empty(made)
            raise PipelineError(f"cannot create {option_value('dest', str(dest))}: {e.strerror or e}") from None
        with folder_lock(dest, True, busy) as fd:
            if _same_folder(fd, dest) if fd is not None else dest.is_dir():  # None: not lockable here
                yield
                return
        log.info("%s was removed while this run waited for it; making it again", dest)
    raise PipelineError(f"cannot hold {option_value('dest', str(dest))}: it was removed again and again while "
                        "this run made it; run this again")


def _same_folder(fd: int, path: Path) -> bool:
    """Whether ``fd`` is still the folder at ``path`` (not one removed, or replaced, since it was opened)."""
    try:
        here, held = os.stat(path), os.fstat(fd)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino)


def missing_folders(dest: Path) -> list[Path]:
    """The folders making ``dest`` would create (dest first, then the parents it lacks)."""
    made, p = [], Path(dest)
    while not os.path.lexists(p) and p != p.parent:
        made.append(p)
        p = p.parent
    return made


def remove_if_empty(folders: list[Path]) -> None:
    """Remove the folders a failed fetch-data made (``missing_folders``, deepest first) while they are still
    empty: an offline first run left an empty --dest behind. A folder holding anything (a .part to resume, a
    file put there meanwhile) is kept, and so is every folder above it."""
    for folder in folders:
        try:
            os.rmdir(folder)  # only an empty one
        except OSError:
            return


def _source_record(archive: Path) -> Path:
    return archive.with_name(f".{archive.name}.url")


def local_source(url: str) -> Path | None:
    """The file a file:// URL reads (never removed, even with --overwrite), else None."""
    parsed = urllib.parse.urlparse(url)
    return Path(urllib.request.url2pathname(parsed.path)) if parsed.scheme == "file" else None


def check_places(cfg: FetchConfig, archive: Path) -> None:
    """Refuse (UsageError) a folder at the archive's place or its .part's in --dest, before anything is fetched:
    the whole download was made, then failed to be renamed ('Is a directory'), or was not begun at all."""
    for place, what in ((archive, "the archive"), (archive.with_name(archive.name + ".part"), "its partial download")):
        if place.is_dir():
            raise UsageError(f"{place} is a folder, where fetch-data keeps {what} of "
                             f"{option_value('url', shown_url(cfg.url))}; "
                             f"move it away, or choose another {option_text('dest')}")


def check_source(cfg: FetchConfig, archive: Path, source: Path | None = None) -> None:
    """Refuse a --url whose archive name is already taken in --dest by another URL's download (complete,
    or a .part to resume), so one never passes for the other, nor is resumed with its bytes; with
    --overwrite, forget the other one and fetch anew.

    An archive without a record (put there by hand, as the offline message says) is taken as is, and so
    is the --url's own file when it lies at the archive's place: what a command reads is never removed.
    """
    part = archive.with_name(archive.name + ".part")
    if not (archive.is_file() or part.is_file()):
        return
    try:
        record = json.loads(_source_record(archive).read_text())
        url = record["url"]
        salt = record.get("salt")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return
    if salt is None and isinstance(url, str) and (hidden := url_record(url))["url"] != url:
        # an older fetch-data's record, the password or signature in it as given: written anew without
        url, salt = hidden["url"], hidden["salt"]
        with contextlib.suppress(OSError):
            _source_record(archive).write_text(json_text({**record, **hidden}))
    if url == recorded_url(cfg.url, None if salt is None else str(salt)):
        return
    own = source is not None and same_file(archive, source)
    held, how = (archive, "fetched") if archive.is_file() else (part, "partly fetched")
    if resigned(url, cfg.url):  # the resume still checks the file is the same one: If-Range, its ETag and size
        log.warning("%s was %s from this URL signed otherwise (an expired link made anew): %s", held, how,
                    "taking it as complete" if held == archive else "resuming it")
        return
    if not (cfg.overwrite or own):
        raise UsageError(f"{held} in {option_text('dest')} was {how} from {shown_url(url)}, not {shown_url(cfg.url)}; "
                         f"choose another {option_text('dest')}, or pass {flag_text('overwrite')} "
                         "to fetch and unpack this URL over it")
    log.warning("%s came from %s: %s anew", held, shown_url(url),
                f"unpacking {shown_url(cfg.url)}" if own else f"fetching {shown_url(cfg.url)}")
    forget = [_source_record(archive), archive.with_name(f".{archive.name}.unpacked"), part]
    for old in forget + ([] if own else [archive]):
        old.unlink(missing_ok=True)


#: query parameters that sign a link (S3's, CloudFront's, Google Cloud Storage's, Alibaba OSS's, a token) rather
#: than name its file; Azure's (AZURE_SIGNING) where the link has its 'sig'
SIGNING_PARAMS = frozenset({"awsaccesskeyid", "signature", "expires", "key-pair-id", "policy", "googleaccessid",
                            "ossaccesskeyid", "token", "access_token", "auth_token"})
SIGNING_PREFIXES = ("x-amz-", "x-goog-")
AZURE_SIGNING = frozenset({"sig", "sv", "ss", "srt", "sp", "se", "st", "spr", "si", "sr", "sdd", "skoid", "sktid",
                           "skt", "ske", "sks", "skv"})


def _query(url: str) -> list[tuple[str, str]]:
    return urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query, keep_blank_values=True)


def _signing(url: str) -> set[str]:
    """The names (lower case) of the URL's query parameters that sign it."""
    keys = {k.lower() for k, _ in _query(url)}
    azure = AZURE_SIGNING if "sig" in keys else frozenset()
    return {k for k in keys if k.startswith(SIGNING_PREFIXES) or k in SIGNING_PARAMS or k in azure}


def resigned(old: str, new: str) -> bool:
    """Whether two URLs name one file and differ only in their signature (a presigned S3 link made anew after
    the first expired): the same scheme, host, path and other query parameters."""
    def unsigned(url):
        parts, signing = urllib.parse.urlsplit(url), _signing(url)
        return (parts.scheme.lower(), parts.netloc.lower(), parts.path,
                sorted((k, v) for k, v in _query(url) if k.lower() not in signing))

    return old != new and bool(_signing(old) | _signing(new)) and unsigned(old) == unsigned(new)


def link_expiry(url: str) -> datetime | None:
    """When a signed link says it expires (S3 and Google Cloud's X-Amz-/X-Goog-Date + Expires, an Expires time
    as S3's older links and CloudFront's carry, Azure's se), else None."""
    q = {k.lower(): v for k, v in _query(url)}
    try:
        for p in SIGNING_PREFIXES:
            if f"{p}date" in q and f"{p}expires" in q:
                signed = datetime.strptime(q[f"{p}date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
                return signed + timedelta(seconds=int(q[f"{p}expires"]))
        if "expires" in q:
            return datetime.fromtimestamp(int(q["expires"]), timezone.utc)
        if "se" in q and "sig" in q:
            at = datetime.fromisoformat(q["se"].replace("Z", "+00:00"))
            return at if at.tzinfo else at.replace(tzinfo=timezone.utc)
    except (ValueError, OverflowError, OSError):
        return None
    return None


def _refused(cfg: FetchConfig, archive: Path, code: int, offset: int) -> str:
    """What a refusal (HTTP 400, 401, 403) may mean: a signed link that expired, and what becomes of the .part."""
    hint = ""
    if _signing(cfg.url):
        end = link_expiry(cfg.url)
        when = f"expired at {end:%Y-%m-%d %H:%M} UTC" if end is not None and end <= datetime.now(timezone.utc) \
            else "may have expired"
        hint = f"; the link {when} (a signed link): get a new one and run this again with it"
    elif code == 400:
        return ""
    if offset:
        hint += (f"; the {offset} bytes of {archive.name}.part are kept, and resumed " +
                 ("from the new link" if hint else "once the server allows it (the same command)"))
    return hint


# -- download ----------------------------------------------------------------------------------
def ensure_room(dest: Path, need: int, what: str) -> None:
    """Refuse (DiskFull, exit 1) before writing ``need`` bytes the disk under dest cannot hold, so a
    decompression bomb or a huge announced download never fills the disk and leaves half of itself."""
    free = shutil.disk_usage(dest).free
    if need > free:
        raise DiskFull(f"{what} needs {need / 1e6:.1f} MB but {dest} has {free / 1e6:.1f} MB free; "
                       f"free some space (or choose another {option_text('dest')}) and run again")


class _Unreachable(PipelineError):
    """The server could not be reached (offline, refused, a name that does not resolve); ``reason`` says why."""

    def __init__(self, message: str, reason):
        super().__init__(message)
        self.reason = reason


def _offline_error(cfg: FetchConfig, archive: Path, why, offset: int = 0) -> PipelineError:
    reason = getattr(why, "reason", why)
    saved = Placeholder(f"file://<where you saved it>/{archive.name}")  # no folder to make: --dest may be gone
    url = shown_url(cfg.url)
    if isinstance(reason, ssl.SSLCertVerificationError):  # no network failure: 'offline?' sent people looking there
        return _Unreachable(f"cannot download {url}: its server's certificate cannot be verified here ({reason}); "
                            "behind a proxy that inspects HTTPS, point the SSL_CERT_FILE environment variable at its "
                            "certificate (python.org's Python on macOS: run its 'Install Certificates.command' once); "
                            f"or download it by hand, then run this again with {option_text('url', saved)}", reason)
    if offset:  # a .part to resume: the same command goes on from it once online
        return _Unreachable(f"cannot download {url} ({reason}); offline? The {offset} bytes of "
                            f"{archive.name}.part are kept: run the same command again to resume", reason)
    return _Unreachable(f"cannot download {url} ({reason}); offline? Download it by hand, then run this again "
                        f"with {option_text('url', saved)} (or put it at {archive}), or point "
                        f"{option_text('data')} at a local image folder", reason)


def _content_range(resp) -> tuple[int, int | None]:
    """(first byte, total size or None) of a 206 answer's Content-Range: 'bytes a-b/total'."""
    value = resp.headers.get("Content-Range", "")
    try:
        span, total = value.split(" ", 1)[1].split("/")
        return int(span.split("-")[0]), None if total == "*" else int(total)
    except (IndexError, ValueError):
        raise PipelineError(f"server sent a malformed Content-Range {value!r}") from None


def _sendable(value) -> bool:
    """Whether a validator can go back in a request header as it is (a folded or hand-edited value cannot)."""
    return isinstance(value, str) and bool(value) and value.isascii() and value.isprintable()


def _http_date(value):
    """An HTTP date as an aware UTC time (a '-0000' zone parses naive, and naive never equals aware), or None."""
    try:
        at = parsedate_to_datetime(value) if value else None
    except (TypeError, ValueError):
        return None
    return at.replace(tzinfo=timezone.utc) if at is not None and at.tzinfo is None else at


def strong_validator(headers) -> str | None:
    """What If-Range may carry to resume this response's file (RFC 9110 13.1.5): its ETag unless weak
    (W/...), else its Last-Modified where the answer's Date is at least a second later (8.8.2.2: a file
    rewritten within that second would keep it); None where it has neither."""
    etag = (headers.get("ETag") or "").strip()
    if etag and not etag.startswith("W/") and _sendable(etag):
        return etag
    modified = (headers.get("Last-Modified") or "").strip()
    when, date = _http_date(modified), _http_date(headers.get("Date"))
    try:
        strong = when is not None and date is not None and (date - when).total_seconds() >= 1
    except TypeError:  # one naive (no zone), one aware
        strong = False
    return modified if strong and _sendable(modified) else None


def part_record(archive: Path) -> tuple[str | None, int | None]:
    """The validator and the size of the file the .part's bytes came from (None: its server did not say,
    or an older fetch-data began the .part)."""
    try:
        record = json.loads(_source_record(archive).read_text())
        value, size = record.get("validator"), record.get("bytes")
    except (OSError, ValueError, AttributeError):
        return None, None
    return value if _sendable(value) else None, size if type(size) is int else None


def replaced_since(resp, validator: str | None, size: int | None) -> str | None:
    """Why a 206 answer's bytes are of another file than the .part's first ones (a server that ignores
    If-Range, or a resume without a validator), else None: its own ETag or Last-Modified, or its size, differ."""
    if getattr(resp, "status", 200) != 206:
        return None
    total = _content_range(resp)[1]
    if size is not None and total is not None and total != size:
        return f"{size} bytes then, {total} now"
    if validator is None:
        return None
    if (then := _http_date(validator)) is not None:  # a Last-Modified
        now = resp.headers.get("Last-Modified")
        differs = (at := _http_date(now)) is not None and at != then
        return f"Last-Modified {validator} then, {now} now" if differs else None
    now = (resp.headers.get("ETag") or "").strip()
    differs = bool(now) and not now.startswith("W/") and now != validator
    return f"ETag {validator} then, {now} now" if differs else None


#: what stays as it is in a URL's path and query when it is sent (reserved characters and '%' escapes)
URL_SAFE = "!#$%&'()*+,/:;=?@[]~"


def request_url(url: str) -> str:
    """The URL as sent: spaces and non-ASCII characters of its path and query percent-encoded (UTF-8) and a
    non-ASCII host in IDNA, as a browser sends a URL copied from its address bar ('.../données/chats v2.zip'
    failed as 'unexpected UnicodeEncodeError ... a bug?', a space as 'URL can't contain control characters ...;
    offline?'); '%XX' escapes already there are kept. A 'user:password@' is left out: ``_open`` answers the
    server's 401 with it (it was sent as part of the host name: 'Name or service not known; offline?')."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    try:
        host = host if host.isascii() else host.encode("idna").decode("ascii")
    except UnicodeError as e:
        raise UsageError(f"{option_value('url', url)} has a host name that cannot be sent ({e})") from None
    netloc = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port is not None else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, urllib.parse.quote(parts.path, safe=URL_SAFE),
                                    urllib.parse.quote(parts.query, safe=URL_SAFE), ""))


def shown_url(url: str) -> str:
    """The URL as messages show it: a password in it masked ('https://ann:***@host/x.zip'), and a user without
    one too, a token given as the user ('https://***@host/x.zip'), as pip shows them."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None:
        return url
    user, _, host = parts.netloc.rpartition("@")
    shown = "***" if parts.password is None else f"{user.partition(':')[0]}:***"
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{shown}@{host}"))


def recorded_url(url: str, salt: str | None) -> str:
    """The URL as the ``.X.url`` record keeps it: its password (its user where it has none: a token) and its
    signing parameters' values (SIGNING_PARAMS) each replaced by 'sha256-' and a salted hash of it (PBKDF2), so a
    later run compares its --url exactly without the secret ever written to disk (it was kept there as given).
    None for salt: the URL as it is."""
    parts = urllib.parse.urlsplit(url)
    if salt is None or parts.scheme == "file":
        return url

    def hashed(secret: str) -> str:  # slow to try passwords against, as a password store's
        return "sha256-" + hashlib.pbkdf2_hmac("sha256", secret.encode(), salt.encode(), 100_000).hex()

    netloc = parts.netloc
    if parts.username is not None:  # a user without a password: a token, as shown_url takes it
        user, _, host = netloc.rpartition("@")
        netloc = (hashed(user) if parts.password is None else f"{user.partition(':')[0]}:{hashed(parts.password)}") + \
            f"@{host}"
    signing = _signing(url)
    query = "&".join(f"{k}={hashed(v)}" if urllib.parse.unquote_plus(k).lower() in signing else piece
                     for piece in parts.query.split("&") for k, _, v in [piece.partition("=")]) if signing else \
        parts.query
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))


def url_record(url: str) -> dict:
    """What the ``.X.url`` record says of the URL: it with its secrets hashed (``recorded_url``), and their salt."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "file" or (parts.username is None and not _signing(url)):
        return {"url": url}
    salt = os.urandom(16).hex()
    return {"url": recorded_url(url, salt), "salt": salt}


def _urlopen(url: str, req: urllib.request.Request, timeout: float):
    """urlopen, answering a 401 with the URL's 'user:password@' (HTTP Basic, as curl and wget do): to its own host
    only, never sent on to the host of a redirect."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None or parts.scheme == "file":
        return urllib.request.urlopen(req, timeout=timeout)
    passwords = urllib.request.HTTPPasswordMgrWithDefaultRealm()
    passwords.add_password(None, req.full_url, urllib.parse.unquote(parts.username),
                           urllib.parse.unquote(parts.password or ""))
    return urllib.request.build_opener(urllib.request.HTTPBasicAuthHandler(passwords)).open(req, timeout=timeout)


def _open(cfg: FetchConfig, archive: Path, offset: int, validator: str | None = None):
    """The response for bytes offset.. of the URL, or None when the server says the file is complete.
    With a validator the server sends the whole file (200) instead when its file is no longer that one."""
    req = urllib.request.Request(request_url(cfg.url), headers={"User-Agent": "transfer-pipeline fetch-data"})
    if offset:
        req.add_header("Range", f"bytes={offset}-")
        if validator:
            req.add_header("If-Range", validator)
    try:
        return _urlopen(cfg.url, req, cfg.timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # nothing left to send: the .part may already be complete
            total = e.headers.get("Content-Range", "").rpartition("/")[2]
            e.close()
            if total.isdigit() and int(total) != offset:
                raise _PartTooLong(int(total)) from None
            return None
        if e.code in BUSY_CODES:  # asked again as a dropped connection is
            after = retry_after(e.headers)
            e.close()
            raise _Busy(f"the server answered HTTP {e.code} {e.reason}", after) from None
        hint = _refused(cfg, archive, e.code, offset) if e.code in (400, 401, 403) else ""
        e.close()
        raise PipelineError(f"cannot download {shown_url(cfg.url)}: the server answered HTTP {e.code} "
                            f"{e.reason}{hint}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise _offline_error(cfg, archive, e, offset) from None


def download(cfg: FetchConfig, archive: Path) -> None:
    """Stream the URL to archive.part (resuming it), check its size, and rename it to archive."""
    part = archive.with_name(archive.name + ".part")
    attempt, warned = 0, set()
    while True:
        offset = part.stat().st_size if part.exists() else 0
        try:
            total = _transfer(cfg, archive, part, offset, warned)
            break
        except KeyboardInterrupt:  # the CLI says only 'interrupted': that the bytes so far are kept is said here
            got = part.stat().st_size if part.exists() else 0
            if got:
                log.warning("%d bytes of %s kept in %s; the same command resumes from them", got, archive.name, part)
            raise
        except _Interrupted as e:
            got = part.stat().st_size if part.exists() else 0
            after = e.after if isinstance(e, _Busy) else None
            asks = f", asking to wait {_duration(after)} (Retry-After)" if after else ""
            if after is not None and after > MAX_RETRY_AFTER:  # never asked again before the server says
                at = datetime.now(timezone.utc) + timedelta(seconds=min(after, 1e9))
                raise PipelineError(f"cannot download {shown_url(cfg.url)}: {e}{asks}, longer than fetch-data waits "
                                    f"({_duration(MAX_RETRY_AFTER)}); run this again after "
                                    f"{at:%Y-%m-%d %H:%M} UTC") from None
            if attempt >= cfg.retries:
                if isinstance(e, _Busy):
                    raise PipelineError(f"cannot download {shown_url(cfg.url)}: {e}, {attempt + 1} "
                                        f"times{asks}") from None
                raise PipelineError(f"download interrupted after {got} bytes ({e}); "
                                    f"run the same command again to resume") from None
            wait = max(cfg.retry_wait * 2 ** attempt, after or 0)
            attempt += 1
            if isinstance(e, _Busy):
                log.warning("%s%s; asking again in %s", e, asks, _duration(wait))
            else:
                log.warning("download interrupted after %d bytes (%s); resuming in %.0f s", got, e, wait)
            time.sleep(wait)
    size = part.stat().st_size
    if total is not None and size != total:
        raise PipelineError(f"downloaded {size} bytes but the server announced {total}; run again to resume")
    if total is None:
        log.warning("the server did not say how large %s is; its size (%d bytes) is unchecked", archive.name, size)
    os.replace(part, archive)
    log.info("downloaded %s (%.1f MB)", archive, size / 1e6)


class _Interrupted(Exception):
    """The connection broke during the transfer (bytes received so far are kept)."""


class _PartTooLong(Exception):
    """The server answered a resume 416, its file being shorter (``total``) than the .part."""

    def __init__(self, total: int):
        super().__init__(total)
        self.total = total


class _Busy(_Interrupted):
    """The server answered one of BUSY_CODES: overloaded for a moment, asked again as a dropped connection is
    (``after``: the seconds its Retry-After asks to wait, else None)."""

    def __init__(self, message: str, after: float | None = None):
        super().__init__(message)
        self.after = after


#: The longest wait a Retry-After gets: a server asking for more (a hostile or misconfigured one: 'Retry-After:
#: 86400') is not asked again; fetch-data stops at once, saying when to run it again.
MAX_RETRY_AFTER = 300


def retry_after(headers) -> float | None:
    """The seconds an answer's Retry-After asks to wait (RFC 9110 10.2.3: a number of seconds, or an HTTP date,
    counted from the answer's own Date where it has one: the two clocks may differ), else None."""
    value = (headers.get("Retry-After") or "").strip() if headers is not None else ""
    if value.isascii() and value.isdigit():
        return float(value)
    if (at := _http_date(value)) is None:
        return None
    now = _http_date(headers.get("Date")) or datetime.now(timezone.utc)
    return max(0.0, (at - now).total_seconds())


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


#: HTTP answers of a server that may answer the same request later (a CDN under load, a rate limit)
BUSY_CODES = (408, 429, 500, 502, 503, 504)


def _transfer(cfg: FetchConfig, archive: Path, part: Path, offset: int, warned: set) -> int | None:
    """Append the rest of the file to part; returns the expected total size (None if unknown).

    A resume sends the validator recorded when the .part began (If-Range), so a file replaced on the
    server since comes whole (200) instead of its tail after the old file's head; ``warned`` keeps the
    warnings a run says once."""
    from ..progress import progress

    validator, size = part_record(archive) if offset else (None, None)
    try:
        resp = _open(cfg, archive, offset, validator)
    except _PartTooLong as e:  # not of this file (or damaged): it was 'delete the .part file and run again'
        log.warning("%s.part holds %d bytes, more than the server's file (%d); downloading it whole again",
                    archive.name, offset, e.total)
        return _transfer(cfg, archive, part, 0, warned)
    except _Unreachable as e:
        if "reached" in warned:  # reached earlier in this run, then dropped: a blip, asked again as a drop is
            raise _Interrupted(f"cannot reconnect: {e.reason}") from None
        raise
    warned.add("reached")
    if resp is None:
        log.info("%s is already complete on disk", part)
        return offset
    if offset and (why := replaced_since(resp, validator, size)):
        resp.close()
        log.warning("%s changed on the server since %s.part was begun (%s); downloading it whole again",
                    archive.name, archive.name, why)
        return _transfer(cfg, archive, part, 0, warned)
    if offset and getattr(resp, "status", 200) == 206 and (start := _content_range(resp)[0]) != offset:
        resp.close()  # a server that cannot resume from there: it was a dead end ('asked ..., it sent from 0')
        log.warning("asked the server for %s from byte %d, it sent from byte %d; downloading it whole again",
                    archive.name, offset, start)
        return _transfer(cfg, archive, part, 0, warned)
    with resp:
        status = getattr(resp, "status", 200)
        length = resp.headers.get("Content-Length")
        if status == 206:
            start, total = _content_range(resp)
            if start != offset:
                raise PipelineError(f"asked the server for bytes from {offset}, it sent from {start}")
            if validator is None and "unchecked" not in warned:
                warned.add("unchecked")
                log.warning("resuming %s.part without a validator (the server sent no strong ETag or Last-Modified, "
                            "or an older fetch-data began it): if the file was replaced on the server since, the "
                            "archive may be corrupt; delete the .part to download it whole", archive.name)
        else:  # 200: the whole file (the server's file changed, or the server does not resume)
            if offset:
                if validator is not None and strong_validator(resp.headers) != validator:
                    log.warning("%s changed on the server since %s.part was begun; downloading it whole again",
                                archive.name, archive.name)
                else:
                    log.warning("the server does not resume downloads; starting %s again", archive.name)
            offset, total = 0, int(length) if length and length.isdigit() else None
            validator, size = strong_validator(resp.headers), total
        if total is not None:  # a .part started over is emptied first: its bytes are room too
            have = part.stat().st_size if part.exists() else 0
            ensure_room(part.parent, total - have, f"downloading {archive.name} ({total} bytes)")
        # whose bytes the .part holds, and which of that URL's files (what a resume sends as If-Range, and checks)
        known = {"validator": validator, "bytes": size}
        _source_record(archive).write_text(json_text({**url_record(cfg.url), **{k: v for k, v in known.items() if v}}))
        with open(part, "ab" if offset else "wb") as f, progress(
                total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                desc=archive.name) as bar:
            while chunk := _read(resp):
                if total is None:  # an endless answer never fills the disk
                    ensure_room(part.parent, len(chunk) + UNKNOWN_SIZE_MARGIN,
                                f"downloading {archive.name} (of a size the server did not say)")
                f.write(chunk)  # a failed write (a disk filled meanwhile) is no dropped connection: never retried
                bar.update(len(chunk))
    if total is not None and part.stat().st_size < total:  # urllib reads a dropped connection as EOF
        raise _Interrupted(f"connection closed at byte {part.stat().st_size} of {total}")
    return total


def _read(resp) -> bytes:
    """The next chunk of the answer; _Interrupted where the connection broke."""
    try:
        return resp.read(CHUNK)
    except (OSError, http.client.HTTPException) as e:
        raise _Interrupted(str(e) or type(e).__name__) from None


# -- unpack ------------------------------------------------------------------------------------
def _plain_path(name: str) -> bool:
    """Whether an entry's name is relative and never climbs ('..'), as written (links aside)."""
    if not name or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return False
    # '..' even where it resolves inside: through a symlink unpacked earlier it may not
    return ".." not in PurePosixPath(name.replace("\\", "/")).parts


def _inside(dest: Path, name: str) -> bool:
    """Whether dest/name stays inside dest once resolved (no absolute path, no '..' escape)."""
    if not _plain_path(name):
        return False
    target = (dest / name).resolve()
    return target == dest or dest in target.parents


def _check_through_links(m, parts: tuple, links: set, files: set) -> None:
    """Refuse a tar entry that would write through a link the archive made before it (into a file
    already in dest, or the archive itself), and a hard link to anything but a file the archive wrote."""
    name = m.name
    if any(parts[:i] in links for i in range(1, len(parts) + 1)):
        raise PipelineError(f"archive entry {name!r} would be written through a link the archive made earlier; "
                            "refusing to unpack")
    if m.islnk() and PurePosixPath(m.linkname).parts not in files:
        raise PipelineError(f"archive entry {name!r} is a hard link to {m.linkname!r}, which is not a file of "
                            "the archive; refusing to unpack")
    if m.issym() or m.islnk():
        links.add(parts)
    elif m.isfile():
        files.add(parts)


def _zip_link(m) -> bool:
    """Whether a zip entry's external attributes mark a symlink (zipfile would unpack it as a small file holding
    its target's name: ``unpack`` skips it, naming it)."""
    return (m.external_attr >> 16) & 0o170000 == 0o120000


def skipped_zip_links(archive: Path, members: list) -> list:
    """The members to unpack: a zip's symbolic links are left out with one warning naming them. zipfile
    writes a link as a small file holding its target's name ('Cat/0.jpg' as a 9-byte 'photo' in a class
    folder: unreadable, skipped by extract as broken), and making real links from a zip is what the tar
    checks guard against; a link is never needed to get the photos themselves."""
    links = [m.filename for m in members if _zip_link(m)]
    if links:
        shown = ", ".join(repr(n) for n in links[:5]) + (f" and {len(links) - 5} more" if len(links) > 5 else "")
        log.warning("%s holds %d symbolic link%s, not unpacked (a zip link would unpack as a small file holding "
                    "its target's name): %s", archive.name, len(links), "" if len(links) == 1 else "s", shown)
    return [m for m in members if not _zip_link(m)]


def _check_layout(name: str, is_dir: bool, link: bool, kinds: dict) -> None:
    """Refuse an entry that cannot be unpacked beside the earlier ones: one inside a name an earlier entry
    unpacks as a file, or makes a zip link ('link' then 'link/x.jpg': the folder it meant), one whose name an
    earlier entry already took as a file or as a folder ('a' and 'a/'), or a file named twice. Unpacking such
    an archive stopped halfway ('Not a directory', 'File exists') or let the second copy silently replace the
    first. ``kinds`` maps the parts of each name seen to 'file', 'link' (a zip's, not unpacked:
    skipped_zip_links) or 'folder' (the folders above an entry count as folders)."""
    parts = PurePosixPath(name).parts
    for i in range(1, len(parts)):
        if (above := kinds.setdefault(parts[:i], "folder")) != "folder":
            what = "makes a symbolic link (a zip's links are not unpacked)" if above == "link" else "unpacks as a file"
            raise PipelineError(f"archive entry {name!r} would be written inside {'/'.join(parts[:i])!r}, which an "
                                f"earlier entry {what}; refusing to unpack")
    kind, before = ("folder" if is_dir else "file"), kinds.get(parts, "").replace("link", "file")
    if parts and before and (kind, before) != ("folder", "folder"):
        why = "is named twice in the archive" if kind == before == "file" else \
            f"is a {kind}, but another entry of the archive makes it a {before}"
        raise PipelineError(f"archive entry {name!r} {why}; refusing to unpack")
    kinds[parts] = "link" if link else kind


#: The zip compression methods Python's zipfile unpacks (Windows' Deflate64, 9, is not among them; Zstandard,
#: 93, is from Python 3.14)
ZIP_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate", zipfile.ZIP_BZIP2: "bzip2",
               zipfile.ZIP_LZMA: "lzma", **({zipfile.ZIP_ZSTANDARD: "zstd"} if hasattr(zipfile, "ZIP_ZSTANDARD")
                                          else {})}
#: names of methods zipfile cannot unpack, for the refusal
OTHER_ZIP_METHODS = {9: "Deflate64", 93: "Zstandard", 95: "xz", 98: "PPMd", 99: "AES-encrypted"}


def _check_zip_entry(m: zipfile.ZipInfo) -> None:
    """Refuse, before anything is written, a zip entry zipfile cannot unpack: a password-protected one, or
    one compressed by another method (they failed halfway as 'unexpected RuntimeError ... a bug?')."""
    if m.flag_bits & 0x1:
        raise PipelineError(f"archive entry {m.filename!r} is encrypted (password-protected); unpack the archive "
                            f"by hand (unzip asks for the password) and point {option_text('data')} at the folder")
    if m.compress_type not in ZIP_METHODS:
        name = OTHER_ZIP_METHODS.get(m.compress_type, "an unknown one")
        raise PipelineError(f"archive entry {m.filename!r} is compressed with method {m.compress_type} ({name}), "
                            f"which Python's zipfile cannot unpack (it can: "
                            f"{', '.join(ZIP_METHODS.values())}); unpack it by hand (7z x ARCHIVE) and point "
                            f"{option_text('data')} "
                            "at the folder")


#: zip "version made by" systems whose file names cannot hold a backslash: MS-DOS/FAT, NTFS, VFAT
WINDOWS_ZIP_SYSTEMS = {0, 11, 14}


def windows_separators(members: list) -> None:
    """Read a backslash in the names of a zip made on Windows as the folder separator it is there (PowerShell's
    Compress-Archive wrote 'PetImages\\Cat\\0.jpg'): zipfile on Linux or macOS would unpack each entry as one file
    of that name at the top of dest. The names are checked as any others afterwards."""
    for m in members:
        if m.create_system in WINDOWS_ZIP_SYSTEMS and "\\" in m.filename:
            m.filename = m.filename.replace("\\", "/")


def own_files(archive: Path) -> set[str]:
    """The names fetch-data keeps beside an archive in dest: its .part and its records (an entry named as
    the archive itself: check_conflicts)."""
    a = archive.name
    return {f"{a}.part", _source_record(archive).name, f".{a}.unpacked", f".{a}.unpacking"}


def _limit(dest: Path, which: str, default: int) -> int:
    try:
        return os.pathconf(dest, which)
    except (OSError, ValueError, AttributeError):  # not said here (Windows has no pathconf)
        return default


def _check_length(name: str, dest: Path, name_max: int, path_max: int) -> None:
    """Refuse (before anything is written) an entry whose name, or a folder's on its way, is longer than the file
    system of dest allows: unpacking stopped at it ('File name too long') and said the same command would finish
    the unpack, which it never could."""
    shown = repr(name if len(name) <= 80 else f"{name[:60]}...{name[-15:]}")
    for part in PurePosixPath(name).parts:
        if (n := len(os.fsencode(part))) > name_max:
            raise PipelineError(f"archive entry {shown} has a name of {n} bytes, longer than the {name_max} the "
                                f"file system of {dest} allows; refusing to unpack (nothing was "
                                f"written): unpack it by hand, renaming it, and point {option_text('data')} at the "
                                "folder")
    if (n := len(os.fsencode(str(dest / name)))) >= path_max:
        raise PipelineError(f"archive entry {shown} would be unpacked to a path of {n} bytes, longer than the "
                            f"{path_max} the file system allows; refusing to unpack (nothing was written): fetch "
                            f"into a shorter {option_text('dest')}, or unpack it by hand")


def check_members(kind: str, arc, dest: Path, own: set = frozenset()) -> list[str]:
    """The archive's entry names; PipelineError naming the first entry that would land outside dest, or on
    one of fetch-data's ``own`` files (a link there made its record be written into a file it points to)."""
    dest = dest.resolve()
    names, links, files, kinds = [], set(), set(), {}
    members = arc.infolist() if kind == "zip" else arc.getmembers()
    name_max, path_max = _limit(dest, "PC_NAME_MAX", 255), _limit(dest, "PC_PATH_MAX", 4096)
    for m in members:
        name = m.filename if kind == "zip" else m.name
        _check_length(name, dest, name_max, path_max)
        if not _inside(dest, name):
            if _plain_path(name) and (link := link_on_the_way(dest / name, dest)):
                raise PipelineError(f"archive entry {name!r} would be written through {link}, a link in {dest} to "
                                    "outside it; refusing to unpack through it: fetch into the link's target as "
                                    f"{option_text('dest')} (or remove the link)")
            raise PipelineError(f"archive entry {name!r} would be written outside {dest}; refusing to unpack")
        if kind == "zip":
            _check_zip_entry(m)
        if PurePosixPath(name).parts in {(o,) for o in own}:
            raise PipelineError(f"archive entry {name!r} would take the place of fetch-data's own "
                                f"{PurePosixPath(name).name}; refusing to unpack")
        if kind == "tar":
            if not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
                raise PipelineError(f"archive entry {name!r} is a device or pipe; refusing to unpack")
            if (m.issym() or m.islnk()) and not hasattr(tarfile, "data_filter"):
                raise PipelineError(f"archive entry {name!r} is a link, and this Python's tarfile cannot unpack "
                                    "links safely (Python >= 3.11.4 can); refusing to unpack")
            if m.issym() or m.islnk():
                base = str(PurePosixPath(name).parent) if m.issym() else ""
                link = m.linkname
                if link.startswith("/") or not _inside(dest, str(PurePosixPath(base) / link)):
                    raise PipelineError(f"archive entry {name!r} links to {link!r} outside {dest}; "
                                     "refusing to unpack")
            _check_through_links(m, PurePosixPath(name).parts, links, files)
        _check_layout(name, m.is_dir() if kind == "zip" else m.isdir(), kind == "zip" and _zip_link(m), kinds)
        names.append(name)
    return names


def ignores_case(dest: Path) -> bool:
    """Whether the file system under dest takes 'a.jpg' and 'A.jpg' for one file (macOS's and Windows' default,
    a FAT drive, an ext4 casefold folder): a probe file made there, and looked up in upper case."""
    probe = dest / f".fetch-data-case-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        return os.path.lexists(dest / probe.name.upper())
    except OSError:
        return False
    finally:
        probe.unlink(missing_ok=True)


def check_case_clashes(names: list, dest: Path) -> None:
    """On a file system that ignores case, refuse (before anything is written) two entries whose names differ
    only in case: the second would replace the first ('Cat/a.jpg', 'Cat/A.jpg'), or two class folders would
    become one ('Cat/', 'cat/')."""
    seen = {}
    for name in names:
        parts = tuple(p for p in PurePosixPath(name).parts if p != ".")
        for i in range(1, len(parts) + 1):
            first = seen.setdefault(tuple(p.casefold() for p in parts[:i]), parts[:i])
            if first != parts[:i]:
                raise PipelineError(f"archive entries {'/'.join(first)!r} and {'/'.join(parts[:i])!r} differ only in "
                                    f"case, which the file system of {dest} does not tell apart (one would replace or "
                                    "join the other); unpack it on a case-sensitive one and point "
                                    f"{option_text('data')} "
                                    "there")


def unpacked_bytes(kind: str, members: list, dest: Path) -> int:
    """What the entries declare they hold once unpacked, less what their files already in dest hold (a
    resumed or --overwrite unpack replaces them): a zip entry never unpacks past its declared size (zipfile
    stops there), and a tar entry's size is what tarfile writes."""
    need = 0
    for m in members:
        target = dest / (m.filename if kind == "zip" else m.name)
        there = target.stat().st_size if target.is_file() and not target.is_symlink() else 0
        need += max(0, (m.file_size if kind == "zip" else m.size) - there)
    return need


#: The most an archive, or one zip entry over RATIO_FLOOR, may unpack to per byte it holds: photos barely
#: compress (JPEGs 1.0 to 1.2:1; the Kaggle zip, JPEGs, two Thumbs.db, a readme and a licence, about 1.04:1),
#: zeros deflate 1000:1 and bzip2 far more: a 370 KB zip of 300 MB was unpacked while the disk had room.
MAX_RATIO = 100
#: entries (a readme, a Thumbs.db) and archives declaring no more than this unpack whatever their ratio
RATIO_FLOOR = 1 << 20


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n} bytes"


def check_ratio(kind: str, members: list, archive: Path) -> None:
    """Refuse (PipelineError, before anything is written) a decompression bomb: a zip entry declaring more than
    MAX_RATIO times its compressed bytes, or an archive declaring more than MAX_RATIO times its own size in all
    (a tar.gz, or zip entries sharing their compressed data). What is written never passes the declared sizes:
    zipfile stops an entry at its declared size (and fails its CRC), tarfile writes an entry's size."""
    limit = f"over the {MAX_RATIO}:1 that archives of photos never near (a decompression bomb?); refusing to " \
            "unpack. If you trust it, unpack it by hand and point --data at the folder"
    total = 0
    for m in members:
        size = m.file_size if kind == "zip" else m.size
        total += size
        if kind == "zip" and size > RATIO_FLOOR and size > MAX_RATIO * m.compress_size:
            raise PipelineError(f"archive entry {m.filename!r} declares {_mb(size)} from {_mb(m.compress_size)} "
                                f"compressed ({size / max(m.compress_size, 1):,.0f}:1), {limit}")
    packed = archive.stat().st_size
    if total > RATIO_FLOOR and total > MAX_RATIO * packed:
        raise PipelineError(f"{archive.name} declares {_mb(total)} unpacked from {_mb(packed)} "
                            f"({total / max(packed, 1):,.0f}:1), {limit}")


#: archives Python's zipfile and tarfile cannot unpack, by their first bytes: what they are, and how to unpack one
OTHER_ARCHIVES = {b"7z\xbc\xaf\x27\x1c": ("a 7z archive", "7z x {}"), b"Rar!\x1a\x07": ("a RAR archive", "7z x {}"),
                  b"\x28\xb5\x2f\xfd": ("a Zstandard-compressed file", "tar --zstd -xf {}")}


#: compressions tarfile unpacks, by their first bytes: a file of one that is no tar is cut off or damaged
COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz"}


def archive_kind(path: Path) -> str:
    if zipfile.is_zipfile(path):
        return "zip"
    try:
        if tarfile.is_tarfile(path):
            return "tar"
    except (EOFError, zlib.error, lzma.LZMAError, OSError) as e:  # a .tar.gz cut off in its first block
        raise PipelineError(f"{path} is a compressed file cut off or damaged ({e}); delete it and download "
                            "again") from None
    with open(path, "rb") as f:
        first = f.read(512)
    if first.startswith(b"PK\x03\x04"):
        raise PipelineError(f"{path} is a zip archive cut off before its end (its table of contents is missing: "
                            "the download stopped early?); delete it and download again")
    for magic, what in COMPRESSED.items():
        if first.startswith(magic):
            raise PipelineError(f"{path} is {what}-compressed, but no tar archive unpacks from it (cut off or "
                                "damaged?); delete it and download again")
    if not first:
        raise PipelineError(f"{path} is an empty file (0 bytes), not an archive: the server sent nothing; delete it "
                            "and run this again")
    head = first.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith((b"<!doctype html", b"<html", b"<head", b"<body", b"<?xml", b"<!--")):
        saved = Placeholder(f"file://<where you saved it>/{path.name}")
        raise PipelineError(f"{path} is a web page (HTML), not an archive: the server sent it in the archive's place "
                            "(a moved link, a login or error page?); delete it, download the archive by hand (in a "
                            f"browser), and run this again with {option_text('url', saved)}")
    for magic, (what, how) in OTHER_ARCHIVES.items():
        if first.startswith(magic):
            raise PipelineError(f"{path} is {what}, which fetch-data cannot unpack (it unpacks zip, and tar plain or "
                                f"gz, bz2, xz compressed); unpack it by hand ({how.format(path.name)}) and point "
                                f"{option_text('data')} at the folder")
    raise PipelineError(f"{path} is neither a zip nor a tar archive; delete it and download again")


#: the modification times a tar entry may set (0001 to 9999, as every platform's time_t holds them)
TIME_RANGE = (-62135596800, 253402300799)


def fix_times(members: list, archive: Path) -> None:
    """Give a tar entry whose modification time no file can carry (NaN, or past year 9999: base-256 and pax
    headers hold any number) the present time, with one warning: unpacking stopped at it, 'unexpected
    OverflowError: timestamp out of range for platform time_t' (or ValueError for NaN), 'a bug?'."""
    odd = []
    for m in members:
        t = m.mtime
        if not (isinstance(t, (int, float)) and math.isfinite(t) and TIME_RANGE[0] <= t <= TIME_RANGE[1]):
            odd.append(m.name)
            m.mtime = int(time.time())
    if odd:
        log.warning("%s: %d %s a modification time no file can have (%s); unpacked with the present time",
                    archive.name, len(odd), "entry carries" if len(odd) == 1 else "entries carry", _some(odd))


def _data_files(kind: str, members: list) -> list[PurePosixPath]:
    """The files (and links) among the entries, less the system's (``.DS_Store``, ``__MACOSX/...``, hidden)."""
    files = [PurePosixPath(m.filename if kind == "zip" else m.name) for m in members
             if not (m.is_dir() if kind == "zip" else m.isdir())]
    return [f for f in files if not (is_os_file(f.name) or f.name.startswith(".")
                                     or any(is_skipped_folder(p) for p in f.parts[:-1]))]


def check_not_empty(kind: str, members: list, archive: Path) -> bool:
    """Refuse (before anything is written) an archive holding no file but the system's (an empty zip, a tar of
    empty folders, a zip of only ``__MACOSX``): it unpacked nothing and named --dest as the data folder.
    Returns whether it holds images (by name, as extract reads them)."""
    files = _data_files(kind, members)
    if not files:
        held = "is empty" if not members else f"holds no files but the system's or empty folders ({len(members)} " \
            f"entr{'y' if len(members) == 1 else 'ies'})"
        raise PipelineError(f"{archive} {held}: no images to unpack; is {option_text('url')} the archive you "
                            f"meant? (it is kept in {option_text('dest')}: delete it before fetching another of its "
                            "name)")
    return any(is_image_name(f.name) for f in files)


ARCHIVE_SUFFIXES = (".zip", ".tar", ".tgz", ".tar.gz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


def warn_no_images(kind: str, members: list, archive: Path, dest: Path) -> None:
    """Say that an archive holds no images extract reads (its files unpacked all the same): archives inside it
    (a Kaggle download of train.zip and test.zip) are named with the fetch-data that unpacks each."""
    files = _data_files(kind, members)
    inner = [f for f in files if f.name.lower().endswith(ARCHIVE_SUFFIXES)]
    if inner:
        log.warning("%s holds no images but %d archive%s (%s): unpack each with fetch-data %s %s", archive.name,
                    len(inner), "" if len(inner) == 1 else "s", _some([f.as_posix() for f in inner]),
                    option_text("url", Placeholder(f"file://{dest / inner[0]}")),
                    option_text("dest", Placeholder("DIR")))
    else:
        log.warning("%s holds no images (%d file%s, none of the types read: %s): %s", archive.name, len(files),
                    "" if len(files) == 1 else "s", " ".join(IMAGE_EXTENSIONS), _some([f.as_posix() for f in files]))


def unpacked_root(dest: Path, names: list[str]) -> Path:
    """The archive's single top-level folder (PetImages for the Kaggle zip), else dest; metadata
    folders beside it (a macOS zip's ``__MACOSX``, hidden ones: folders.is_skipped_folder) do not count.
    Below it, a folder whose one folder holds folders in turn is passed through ('food/images/{apple,pear}':
    food/images, not food, a data folder of one class)."""
    paths = [PurePosixPath(n).parts for n in names]

    def folders(below: tuple) -> set:
        n = len(below)
        subs = {p[n] for p in paths if len(p) > n and p[:n] == below}
        return {t for t in subs if (dest.joinpath(*below, t)).is_dir() and not is_skipped_folder(t)}

    tops = folders(())
    if len(tops) != 1:
        return dest
    root = (tops.pop(),)
    while len(inner := folders(root)) == 1 and folders(one := root + (inner.pop(),)):
        root = one
    return dest.joinpath(*root)


TRAIN_SPLITS, OTHER_SPLITS = {"train", "training"}, {"test", "testing", "val", "valid", "validation", "dev"}


def warn_splits(root: Path) -> None:
    """Say when the folder unpacked holds split folders (train/, test/, val/), each of classes: as --data its
    classes would be 'train' and 'test'; its training split is the data folder, its test split fit-head's
    --test-data."""
    try:
        subs = {e.name.casefold(): e.name for e in os.scandir(root) if e.is_dir() and not is_skipped_folder(e.name)}
    except OSError:
        return
    train = next((subs[n] for n in sorted(TRAIN_SPLITS) if n in subs), None)
    others = [subs[n] for n in sorted(OTHER_SPLITS) if n in subs]
    if train is None or not others or not any(e.is_dir() for e in os.scandir(root / train)):
        return
    log.warning("%s holds split folders (%s), each of classes, not classes: give %s as %s, and %s as fit-head's "
                "%s", root, ", ".join([train, *others]), root / train, option_text("data"), root / others[0],
                option_text("test_data"))


def _some(names: list) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def check_beside(kind: str, members: list, dest: Path, archive: Path) -> None:
    """Refuse (before anything is written) an archive without a single top folder (its classes at its top:
    dest itself becomes the data folder) into a dest holding folders not from it, which would become classes
    beside its own (PetImages of an earlier fetch, with cats and dogs together)."""
    tops = set()
    for m in members:
        parts = PurePosixPath(m.filename if kind == "zip" else m.name).parts
        if len(parts) > 1 or (parts and (m.is_dir() if kind == "zip" else m.isdir())):
            tops.add(parts[0])
    tops = {t for t in tops if not is_skipped_folder(t)}
    if len(tops) < 2:
        return
    with os.scandir(dest) as entries:
        others = sorted(e.name for e in entries if e.is_dir() and not is_skipped_folder(e.name) and e.name not in tops)
    if others:
        raise PipelineError(f"{archive.name} has no single top folder: its folders ({_some(sorted(tops))}) would "
                            f"unpack into {dest} beside {_some(others)}, and as one data folder all would be its "
                            f"classes; fetch it into a {option_text('dest')} of its own (a new folder)")


def check_into(names: list, dest: Path, archive: Path) -> None:
    """Refuse (before anything is written) an archive whose top folder is already in dest holding files not from
    it (another archive's PetImages, photos named otherwise): unpacked into it, the data folder would hold both.
    Its own files (an unpack stopped halfway) and the system's (.DS_Store, Thumbs.db, hidden ones) do not count."""
    mine = {PurePosixPath(n) for n in names}
    tops = {p.parts[0] for p in mine if len(p.parts) > 1 and not is_skipped_folder(p.parts[0])}
    for top in sorted(tops):
        folder = dest / top
        if not folder.is_dir():
            continue
        foreign = []
        for where, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if not is_skipped_folder(d))
            rel = PurePosixPath(Path(where).relative_to(dest).as_posix())
            foreign += [rel / f for f in sorted(files)
                        if not (f.startswith(".") or is_os_file(f)) and rel / f not in mine]
        if foreign:
            shown = _some([p.relative_to(top).as_posix() for p in foreign])
            raise PipelineError(f"{folder} already holds {len(foreign)} file{'' if len(foreign) == 1 else 's'} not "
                                f"from {archive.name} ({shown}): unpacked into it, one data folder would hold "
                                f"both; fetch it into a {option_text('dest')} of its own, or pass "
                                f"{flag_text('overwrite')} to unpack into it anyway")


def _marker_bytes(marker: Path):
    """The archive size a marker file records, or None (no marker, or a foreign one)."""
    try:
        return json.loads(marker.read_text())["bytes"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def unfinished_unpack(folder: Path) -> Path | None:
    """The record (``.X.unpacking``) of an unpack stopped halfway (Ctrl-C, a kill, a full disk) that wrote
    into ``folder``: as dest (the folder holds it) or as one of its top-level folders (its parent holds it,
    naming the folder among its ``tops``), else None. Such a folder lacks files the archive holds; the same
    fetch-data finishes it."""
    folder = Path(folder)
    for record in sorted(folder.glob(".*.unpacking")):
        return record
    for record in sorted(folder.parent.glob(".*.unpacking")):
        try:
            tops = json.loads(record.read_text()).get("tops")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(tops, list) and folder.name in tops:
            return record
    return None


def check_conflicts(kind: str, members: list, dest: Path, overwrite: bool, keep=()) -> None:
    """Refuse (PipelineError naming the first) files already in dest that an entry would replace;
    with ``overwrite`` remove them instead, so nothing is written through an existing link, except the
    files in ``keep`` (the archive and the --url's own file), which are refused even then. A file (or a link to
    none) where an entry needs a folder counts too: unpacking stopped at it halfway ('Not a directory'), with
    ``overwrite`` as well."""
    above_seen = set()
    for m in members:
        name = m.filename if kind == "zip" else m.name
        parts = PurePosixPath(name).parts
        for i in range(1, len(parts)):
            if parts[:i] in above_seen:
                continue
            above_seen.add(parts[:i])
            above = dest.joinpath(*parts[:i])
            if os.path.lexists(above) and not above.is_dir():
                if any(k is not None and same_file(above, k) for k in keep):
                    raise PipelineError(f"the archive would replace {above}, the file it is unpacked from, with a "
                                        f"folder; fetch into another {option_text('dest')}")
                if not overwrite:
                    raise PipelineError(f"{above} already exists as a file where the archive unpacks a folder "
                                        f"({name!r} inside it); move it away, or unpack over it with "
                                        f"{flag_text('overwrite')}")
                above.unlink()
        target = dest / name
        is_dir = m.is_dir() if kind == "zip" else m.isdir()
        if not os.path.lexists(target) or (is_dir and target.is_dir() and not target.is_symlink()):
            continue
        if any(k is not None and same_file(target, k) for k in keep):
            raise PipelineError(f"the archive would replace {target}, the file it is unpacked from; "
                                f"fetch into another {option_text('dest')}")
        if overwrite and target.is_dir() and not target.is_symlink():  # never removed: it may hold anything
            raise PipelineError(f"{target} is a folder where the archive unpacks a file, which even "
                                f"{flag_text('overwrite')} never removes; move it away")
        if not overwrite:
            raise PipelineError(f"{target} already exists and the archive would overwrite it; move it away, "
                                f"or unpack over it with {flag_text('overwrite')}")
        target.unlink()


def unpack(archive: Path, dest: Path, overwrite: bool = False, keep: Path | None = None) -> tuple[Path, bool]:
    """Unpack archive into dest (once: a marker file records it); returns (unpacked root, unpacked now).

    Files already in dest are never overwritten silently: see check_conflicts."""
    from ..progress import progress

    marker = dest / f".{archive.name}.unpacked"
    size = archive.stat().st_size
    try:
        done = json.loads(marker.read_text())
        root = dest / done["root"]
        if done["bytes"] == size and root.is_dir():
            if not overwrite:
                log.info("already unpacked: %s", root)
                return root, False
            # asked to unpack over it: files removed or changed since come back (it said 'already unpacked')
            log.info("unpacking %s again over its earlier unpack (%s)", archive.name, flag_text("overwrite"))
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no marker (or a foreign one): unpack
    kind = archive_kind(archive)
    opener = zipfile.ZipFile if kind == "zip" else tarfile.open
    try:
        with opener(archive) as arc:
            if kind == "zip":
                windows_separators(arc.infolist())
            names = check_members(kind, arc, dest, own_files(archive))
            if ignores_case(dest):
                check_case_clashes(names, dest)
            members = skipped_zip_links(archive, arc.infolist()) if kind == "zip" else arc.getmembers()
            images = check_not_empty(kind, members, archive)
            if kind == "tar":
                fix_times(members, archive)
            check_ratio(kind, members, archive)
            check_beside(kind, members, dest, archive)
            if not overwrite:
                check_into(names, dest, archive)
            ensure_room(dest, unpacked_bytes(kind, members, dest), f"unpacking {archive.name}")
            started = dest / f".{archive.name}.unpacking"
            # a run cut off mid-unpack left its own files: those it may replace
            check_conflicts(kind, members, dest, overwrite or _marker_bytes(started) == size, keep=(archive, keep))
            tops = sorted({PurePosixPath(n).parts[0] for n in names if PurePosixPath(n).parts})
            started.write_text(json_text({"archive": archive.name, "bytes": size, "tops": tops}))
            for m in progress(members, desc=f"unpack {archive.name}", unit="file"):
                if kind == "tar" and hasattr(tarfile, "data_filter"):
                    arc.extract(m, dest, filter="data")  # the standard library's own safety net, too
                else:
                    arc.extract(m, dest)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as e:  # damaged data
        raise PipelineError(f"cannot unpack {archive}: {e}; delete it and download again") from None
    except OSError as e:  # a full disk, no permission: the files so far stay, and the next run replaces them
        why = disk_reason(e) or e
        raise PipelineError(f"cannot unpack {archive} into {dest}: {why}; the files unpacked so far are kept and "
                            "the same command finishes the unpack once this is fixed") from None
    root = unpacked_root(dest, names)
    if not images:
        warn_no_images(kind, members, archive, dest)
    marker.write_text(json_text({"archive": archive.name, "bytes": size,
                                  "root": root.relative_to(dest).as_posix()}))
    started.unlink(missing_ok=True)
    log.info("unpacked %d entries of %s to %s", len(members), archive.name, root)  # zip links left out
    return root, True
