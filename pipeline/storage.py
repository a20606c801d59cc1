"""Object storage: the one place curate talks to fsspec (`s3://`, `gs://`, `file://`, ...).

A shard or export URL is opened, listed and written here, so that three rules hold everywhere:
transient errors (throttling, 5xx, resets, timeouts) are retried with exponential backoff a
bounded number of times, and anything else fails at once; every failure is one CurateError line
naming the URL; and no credential (a storage option such as `secret` or `token`, a password in a
URL, the AWS_* secrets of the environment) is ever put into a message, a record or a log.

Retries: `CURATE_IO_ATTEMPTS` (default 5) attempts per operation, sleeping `CURATE_IO_BACKOFF`
(default 0.5 s) times 2**i between them, capped at 30 s. These come on top of the backend's own
retries (botocore and s3fs retry throttling themselves): curate's outlast a longer outage and
cover reads that fail mid-stream, which it resumes at the byte it had reached.
fsspec is imported lazily: stages import this module on machines that only read local shards.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import re
import secrets
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

from .errors import CurateError

log = logging.getLogger("curate.storage")
T = TypeVar("T")

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*(::[A-Za-z][A-Za-z0-9+.\-]*)*://")
# Option names whose values are credentials: s3fs key/secret/token/username/password, the
# client_kwargs aws_* names, gcsfs token, adlfs account_key/sas_token/client_secret/
# connection_string, an http Authorization header.
_SECRET_NAME = re.compile(r"key|secret|token|passw|credential|auth|sas|signature|connection_string|session|username",
                          re.I)
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AZURE_STORAGE_KEY",
               "AZURE_STORAGE_SAS_TOKEN", "AZURE_STORAGE_CONNECTION_STRING", "AZURE_CLIENT_SECRET")
REDACTED = "***"
EXPORT_MARKER = "_curate_export.json"
EXPORT_FORMAT = "curate-export/1"


class StorageError(CurateError):
    """An object-storage operation failed for good (not retried, or retried to the limit)."""


def is_url(path: str | os.PathLike) -> bool:
    """Whether `path` names a location through fsspec (`s3://...`, `file://...`, `simplecache::s3://...`)."""
    return isinstance(path, str) and _URL.match(path) is not None


# ---------------------------------------------------------------- credentials kept out of sight
def is_secret(name: str) -> bool:
    return bool(_SECRET_NAME.search(str(name)))


def redact(options: Any) -> Any:
    """`options` with every credential value replaced by `***` (nested mappings and lists too,
    URL passwords included): what run.json and logs may show."""
    if isinstance(options, dict):
        return {k: (REDACTED if is_secret(k) and v not in (None, "", False) else redact(v)) for k, v in options.items()}
    if isinstance(options, (list, tuple)):
        return [redact(v) for v in options]
    return redact_url(options) if isinstance(options, str) else options


def public_options(options: Any) -> Any:
    """`options` without its credentials at all: what fingerprints hash, so that rotating a key
    (or moving it to the environment) leaves every fingerprint as it was."""
    if isinstance(options, dict):
        return {k: public_options(v) for k, v in options.items() if not is_secret(k)}
    if isinstance(options, (list, tuple)):
        return [public_options(v) for v in options]
    return redact_url(options) if isinstance(options, str) else options


_USERINFO = re.compile(r"(://)([^/@\s:]*):([^/@\s]*)@")
_QUERY_SECRET = re.compile(r"([?&][^=&#\s]*(?:key|secret|token|signature|sig|credential|auth)[^=&#\s]*=)[^&#\s]*", re.I)


def redact_url(url: str) -> str:
    """A URL without a password (`scheme://user:***@host`) or signed-query secrets."""
    return _QUERY_SECRET.sub(r"\1" + REDACTED, _USERINFO.sub(r"\1\2:" + REDACTED + "@", url))


def _secret_values(options: Any) -> Iterable[str]:
    if isinstance(options, dict):
        for k, v in options.items():
            if is_secret(k) and isinstance(v, str):
                yield v
            else:
                yield from _secret_values(v)
    elif isinstance(options, (list, tuple)):
        for v in options:
            yield from _secret_values(v)


def scrub(text: str, options: Any = None) -> str:
    """`text` with any credential it might quote (from `options` or the environment) replaced by
    `***`: the last line of defence for messages built from a backend's exception text."""
    values = [*_secret_values(options), *(os.environ.get(n, "") for n in _SECRET_ENV)]
    for v in sorted({v for v in values if len(v) >= 4}, key=len, reverse=True):
        text = text.replace(v, REDACTED)
    return redact_url(text)


# ---------------------------------------------------------------- which options a URL uses
_OPTIONS: dict[str, dict] = {}  # URL prefix -> storage_options


def register(prefix: str, options: dict) -> None:
    """Remember the storage_options of the catalog entry whose shards start with `prefix`, so that
    any reader of a shard URL (index, embed, materialize, verify) opens it with them. The catalog
    registers its entries when it loads, in whichever process loads it, and again each time an
    entry is looked up: where two entries name the same shards, the one in use wins."""
    _OPTIONS[prefix] = dict(options)


def options_for(url: str) -> dict:
    """The storage_options registered for the longest prefix of `url` ({} if none: the
    environment's credentials and the backend's defaults)."""
    best = max((p for p in _OPTIONS if url.startswith(p)), key=len, default=None)
    return {} if best is None else _OPTIONS[best]


def url_prefix(pattern: str) -> str:
    """The part of a brace pattern before its first group: every shard it names starts with it."""
    return pattern.split("{", 1)[0]


# ---------------------------------------------------------------- retries
_TRANSIENT_ERRNO = {errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED,
                    errno.ECONNREFUSED, errno.EPIPE, errno.ENETDOWN, errno.ENETUNREACH, errno.EHOSTUNREACH,
                    getattr(errno, "EREMOTEIO", 121)}
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
                    "TooManyRequests", "TooManyRequestsException", "RequestLimitExceeded", "BandwidthLimitExceeded",
                    "RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable",
                    "ServiceUnavailableException", "PriorRequestNotComplete"}
# Connection and timeout failures of botocore, aiohttp, urllib3, requests and fsspec, by class name
# (so that none of them has to be imported to recognise its errors).
_TRANSIENT_TYPES = {"ConnectionError", "TimeoutError", "EndpointConnectionError", "ConnectionClosedError",
                    "ReadTimeoutError", "ConnectTimeoutError", "IncompleteRead", "ResponseParserError",
                    "FSTimeoutError", "ServerDisconnectedError", "ClientPayloadError", "ClientConnectionError",
                    "ClientOSError", "ServerTimeoutError", "ProtocolError", "ChunkedEncodingError",
                    "ResponseStreamingError"}
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)


def _chain(exc: BaseException) -> Iterable[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _response(exc: BaseException) -> tuple[str, int] | None:
    """(error code, HTTP status) of a botocore-style ClientError anywhere in the chain."""
    for e in _chain(exc):
        resp = getattr(e, "response", None)
        if isinstance(resp, dict) and isinstance(resp.get("Error"), dict):
            status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            return str(resp["Error"].get("Code") or status), int(status)
    return None


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: throttling, a 5xx, a reset or refused connection, a timeout. A missing
    object, a refused permission, a bad bucket or a bad option is not."""
    if isinstance(exc, (_PERMANENT, CurateError)):
        return False
    resp = _response(exc)
    if resp is not None:
        code, status = resp
        return code in _TRANSIENT_CODES or status == 429 or status >= 500
    for e in _chain(exc):
        if any(c.__name__ in _TRANSIENT_TYPES for c in type(e).__mro__):
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNO:
            return True
    return False


def _reason(exc: BaseException, options: Any) -> str:
    resp = _response(exc)
    if isinstance(exc, FileNotFoundError):
        why = "no such object or bucket"
    elif isinstance(exc, PermissionError):
        why = "access denied (credentials come from the environment, a profile or the entry's storage_options)"
    else:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        why = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    if resp is not None and resp[0] not in why:
        why += f" [{resp[0]}]"
    return scrub(why[:300], options)


def policy() -> tuple[int, float]:
    """(attempts, base delay in seconds) from CURATE_IO_ATTEMPTS / CURATE_IO_BACKOFF."""
    try:
        attempts = int(os.environ.get("CURATE_IO_ATTEMPTS", "5"))
        base = float(os.environ.get("CURATE_IO_BACKOFF", "0.5"))
    except ValueError:
        raise CurateError("CURATE_IO_ATTEMPTS must be an integer and CURATE_IO_BACKOFF a number of seconds") from None
    if attempts < 1 or not 0 <= base <= 60:
        raise CurateError("CURATE_IO_ATTEMPTS must be >= 1 and CURATE_IO_BACKOFF within 0..60 seconds")
    return attempts, base


def retry(op: Callable[[], T], what: str, url: str, options: Any = None, missing_ok: bool = False) -> T | None:
    """op(), retried on transient errors with exponential backoff; any other error (or the last
    transient one) becomes one StorageError line: `<what> <url>: <reason>`. With missing_ok, a
    missing object answers None instead."""
    attempts, base = policy()
    for i in range(attempts):
        try:
            return op()
        except CurateError:
            raise
        except Exception as exc:  # noqa: BLE001 - every backend error is classified here
            if missing_ok and isinstance(exc, FileNotFoundError):
                return None
            where = f"{what} {redact_url(url)}"
            if not is_transient(exc):
                raise StorageError(f"{where}: {_reason(exc, options)}") from None
            if i + 1 == attempts:
                raise StorageError(f"{where}: gave up after {attempts} attempt(s): {_reason(exc, options)}") from None
            delay = min(base * 2**i, 30.0)
            log.warning("%s: %s; retrying in %.2f s (attempt %d of %d)", where, _reason(exc, options), delay,
                        i + 2, attempts)
            time.sleep(delay)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------- filesystems, reading
def filesystem(url: str, options: dict | None = None):
    """(fsspec filesystem, path within it) for `url`, built from `options` passed unchanged."""
    try:
        import fsspec
    except ImportError:
        raise StorageError(f"{redact_url(url)}: reading URLs needs fsspec (pip install fsspec s3fs)") from None
    try:
        return fsspec.core.url_to_fs(url, **(options or {}))
    except ImportError as exc:
        raise StorageError(f"{redact_url(url)}: no fsspec backend for it ({scrub(str(exc), options)})") from None
    except (TypeError, ValueError) as exc:
        raise StorageError(f"{redact_url(url)}: bad storage_options ({scrub(str(exc), options)})") from None


def _identity(info: dict | None) -> tuple | None:
    if not info:
        return None
    return (info.get("size"), info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("mtime")
            or info.get("LastModified"))


class _Reader(io.RawIOBase):
    """A read-only stream over one object that survives transient errors: after one it reopens the
    object and seeks back to the byte it had reached (refusing an object replaced meanwhile)."""

    def __init__(self, url: str, options: dict):
        super().__init__()
        self.url, self.options = url, options
        self.fs, self.path = filesystem(url, options)
        self.pos = 0
        self._id = None
        self._fh = retry(self._open, "open", url, options)

    def _open(self):
        fh = self.fs.open(self.path, "rb")
        try:
            ident = _identity(getattr(fh, "details", None))
            if self._id is not None and ident != self._id:
                raise StorageError(f"read {redact_url(self.url)}: the object changed while it was being read")
            self._id = ident
            if self.pos:
                fh.seek(self.pos)
        except BaseException:
            fh.close()
            raise
        return fh

    def readable(self) -> bool:
        return True

    def _read(self, n: int) -> bytes:
        if self._fh is None:
            self._fh = self._open()
        try:
            return self._fh.read(n)
        except BaseException:
            fh, self._fh = self._fh, None
            try:
                fh.close()
            except Exception:  # noqa: BLE001 - the read error is the one to report
                pass
            raise

    def read(self, n: int = -1) -> bytes:
        data = retry(lambda: self._read(n), "read", self.url, self.options)
        self.pos += len(data)
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if self._fh is not None:
            fh, self._fh = self._fh, None
            try:
                fh.close()
            except Exception:  # noqa: BLE001
                pass
        super().close()


def open_stream(url: str, options: dict | None = None) -> io.RawIOBase:
    """Stream an object for reading (nothing is downloaded to disk); `options` default to those
    registered for the URL (its catalog entry's storage_options)."""
    return _Reader(url, options_for(url) if options is None else options)


def read_bytes(url: str, options: dict | None = None, missing_ok: bool = False) -> bytes | None:
    """A small object's bytes (a sizes.json, a manifest, a marker), or None if missing and missing_ok."""
    options = options_for(url) if options is None else options
    fs, path = filesystem(url, options)
    return retry(lambda: fs.cat_file(path), "read", url, options, missing_ok=missing_ok)


def stat_many(urls: list[str], options: dict | None = None) -> dict[str, dict | None]:
    """url -> its listing entry (size, ETag, LastModified, ... as the backend gives them), or None if
    it does not exist. One listing per folder, freshly fetched: a split of 10,000 shards costs a
    few list requests, not 10,000."""
    by_dir: dict[str, list[str]] = defaultdict(list)
    for u in urls:
        by_dir[u.rsplit("/", 1)[0]].append(u)
    found: dict[str, dict | None] = {}
    for folder, members in by_dir.items():
        opts = options_for(folder + "/") if options is None else options
        fs, path = filesystem(folder, opts)
        fs.invalidate_cache(path)
        listing = retry(lambda: fs.ls(path, detail=True), "list", folder, opts, missing_ok=True) or []
        names = {fs._strip_protocol(e["name"]).rstrip("/"): e for e in listing if e.get("type") != "directory"}
        for u in members:
            found[u] = names.get(fs._strip_protocol(u))
    return found


# ---------------------------------------------------------------- export
def _put(fs, local: Path, path: str, url: str, options: dict) -> None:
    """Upload one file; on a local filesystem through a temporary and a rename (object stores make a
    PUT visible only once complete)."""
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        parent, name = path.rsplit("/", 1)
        retry(lambda: fs.makedirs(parent, exist_ok=True), "write", url, options)
        tmp = f"{parent}/.{name}.{secrets.token_hex(4)}.tmp"
        retry(lambda: fs.put_file(str(local), tmp), "write", url, options)
        retry(lambda: fs.mv(tmp, path), "write", url, options)
    else:
        retry(lambda: fs.put_file(str(local), path), "write", url, options)


def export_dir(src: Path, dest: str, options: dict | None, owner: str, last: str = "manifest.parquet") -> dict:
    """Upload every file under `src` to `dest/<relative path>`, `last` after all others, so that a
    reader who sees it sees a complete export.

    Nothing curate did not write is ever replaced or deleted: `dest/_curate_export.json` records the
    run (`owner`) and the files of its export. An empty destination is claimed; one holding an export
    of this run is replaced (its `last` file removed first, then its files no longer exported); one
    holding anything else is refused in one line, unless its `last` file is byte-identical to ours
    (the same export, already there: nothing is written). Returns what metrics record.
    """
    options = options or {}
    dest = dest.rstrip("/")
    files = sorted(p.relative_to(src).as_posix() for p in Path(src).rglob("*")
                   if p.is_file() and not p.name.startswith(".") and p.name not in (EXPORT_MARKER, "_stage.json"))
    if last not in files:
        raise StorageError(f"export {redact_url(dest)}: nothing to export ({last} missing in {src})")
    files = [f for f in files if f != last] + [last]
    fs, root = filesystem(dest, options)
    fs.invalidate_cache(root)
    present = retry(lambda: fs.find(root), "list", dest, options, missing_ok=True) or []
    present = {fs._strip_protocol(p)[len(fs._strip_protocol(root)):].lstrip("/") for p in present}
    marker = _read_marker(fs, root, dest, options) if EXPORT_MARKER in present else None
    ours = marker is not None and marker.get("owner") == owner
    done = {"url": redact_url(dest), "files": len(files), "written": False}
    if present and not ours:
        if last in present and read_bytes(f"{dest}/{last}", options) == (Path(src) / last).read_bytes():
            return done  # already there, byte for byte
        whose = (f"the export of run {marker.get('owner')}" if marker
                 else f"{sorted(present)[0]}, which curate did not write")
        raise StorageError(f"export {redact_url(dest)}: destination holds {whose}; choose another export URL")
    mine = set(marker.get("files", [])) if ours else set()
    foreign = sorted((set(files) & present) - mine)
    if foreign:
        raise StorageError(f"export {redact_url(dest)}: {foreign[0]} is there and curate did not write it; "
                           "choose another export URL")
    if ours and last in present:
        if read_bytes(f"{dest}/{last}", options) == (Path(src) / last).read_bytes():
            return done
        retry(lambda: fs.rm_file(f"{root}/{last}"), "delete", dest, options)  # the old export is incomplete now
    for stale in sorted((mine & present) - set(files) - {last}):
        retry(lambda: fs.rm_file(f"{root}/{stale}"), "delete", dest, options, missing_ok=True)
    body = json.dumps({"format": EXPORT_FORMAT, "owner": owner, "files": files}, indent=1, sort_keys=True) + "\n"
    with tempfile.TemporaryDirectory(prefix="curate-export-") as tmp:
        (Path(tmp) / EXPORT_MARKER).write_text(body)
        _put(fs, Path(tmp) / EXPORT_MARKER, f"{root}/{EXPORT_MARKER}", f"{dest}/{EXPORT_MARKER}", options)
    for f in files:
        _put(fs, Path(src) / f, f"{root}/{f}", f"{dest}/{f}", options)
    done["written"] = True
    return done


def export_subset(src: Path, export: str, sel: str, options: dict | None, entry_options: dict, owner: str) -> dict:
    """materialize's export: the unit's files to `<export>/<sel>/` (see export_dir), with the
    config's storage_options, or the dataset entry's where the config sets none."""
    return export_dir(src, f"{export.rstrip('/')}/{sel}", entry_options if options is None else options, owner)


def _read_marker(fs, root: str, dest: str, options: dict) -> dict:
    raw = retry(lambda: fs.cat_file(f"{root}/{EXPORT_MARKER}"), "read", dest, options)
    try:
        marker = json.loads(raw)
    except ValueError:
        marker = None
    if not isinstance(marker, dict) or marker.get("format") != EXPORT_FORMAT:
        raise StorageError(f"export {redact_url(dest)}: {EXPORT_MARKER} there is not curate's; "
                           "choose another export URL")
    return marker
