"""fetch-data's download: HTTP (and file://) to ``<dest>/<name>.part``, resumed with If-Range and checked to be of
the same file, retried after a dropped connection or a busy server (its Retry-After), the disk's room checked,
and renamed to ``<name>`` once its size is checked.
"""
from __future__ import annotations

import http.client
import json
import logging
import os
import shutil
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path

from ..config import FetchConfig, Placeholder, option_text
from ..errors import DiskFull, PipelineError
from ..files import json_text
from .fetch_urls import _signing, _source_record, link_expiry, request_url, shown_url, url_record

#: fetch-data's one logger, named as before its modules were split apart (a filter, a test, names it)
log = logging.getLogger("pipeline.data.fetch")

CHUNK = 1 << 20
#: Room a download of unknown size leaves free: it stops there (the .part kept) rather than fill the disk.
UNKNOWN_SIZE_MARGIN = 64 << 20


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
