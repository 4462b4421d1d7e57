"""fetch-data's URLs: what a --url may be, its archive's name, signed links (their signature and expiry), the URL
as sent and as shown (credentials masked), and the ``.X.url`` record kept in --dest (secrets hashed), with the
checks made against it before anything is fetched.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import urllib.parse
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path, PurePosixPath

from ..config import FetchConfig, Placeholder, flag_text, option_text, option_value
from ..errors import UsageError
from ..files import json_text, plain_name, same_file

#: fetch-data's one logger, named as before its modules were split apart (a filter, a test, names it)
log = logging.getLogger("pipeline.data.fetch")

#: Microsoft's Kaggle cats-and-dogs archive (786 MB; unpacks to PetImages/Cat and PetImages/Dog).
URL_SCHEMES = ("http", "https", "file")


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
