"""Where run outputs live: a local path, `file://...`, or an S3-compatible object store.

One small surface for every component that writes run outputs (replay store, checkpoints,
run directories), so a URI never goes through `Path.resolve()`:

    fs, path = open_location("s3://bucket/run1?endpoint_override=127.0.0.1:9000&scheme=http")
    write_file_once("s3://bucket/run1/ckpt/step-10/meta.json", data)   # final name, one PUT
    is_local("runs/x") -> True;  join("s3://b/run1", "ckpt", "a.bin") -> "s3://b/run1/ckpt/a.bin"

S3 credentials are explicit: the URI's user info (`s3://KEY:SECRET@bucket/...`) or the
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY variables. AWS_EC2_METADATA_DISABLED is forced to
"true" before any S3 filesystem is built, so the AWS SDK never probes the cloud metadata
address. Query parameters: endpoint_override, scheme (http|https), region.

Object stores have no atomic rename (pyarrow's `move` there is a copy plus a delete), so
`write_file_once` writes the final name once: a PUT is all-or-nothing, readers see the old
object or the new one. On a local disk it writes a temp file, fsyncs it, renames it over the
final name and fsyncs the directory.
"""
from __future__ import annotations

import os
from urllib.parse import parse_qs, unquote, urlsplit

import pyarrow.fs as pafs

TMP_SUFFIX = ".tmp"
_S3_SCHEMES = ("s3", "s3a")


def is_uri(location: str) -> bool:
    """Whether `location` names a filesystem by scheme (`file://`, `s3://`), not a bare path."""
    return "://" in location


def is_local(location: str) -> bool:
    """A bare path or a `file://` URI: the local disk, where fsync and rename work."""
    return not is_uri(location) or urlsplit(location).scheme == "file"


def join(location: str, *parts: str) -> str:
    """Append path parts to a path or URI (keeps a URI's query string, if any)."""
    if not is_uri(location):
        return os.path.join(location, *parts)
    head, sep, query = location.partition("?")
    return "/".join([head.rstrip("/"), *(p.strip("/") for p in parts)]) + sep + query


def redact(location: str) -> str:
    """`location` without the credentials a URI may carry (for messages and saved configs)."""
    if not is_uri(location):
        return location
    parts = urlsplit(location)
    if "@" not in parts.netloc:
        return location
    return parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]).geturl()


def local_path(location: str) -> str:
    """The filesystem path of a local location (bare path, absolute, or `file://`)."""
    if not is_local(location):
        raise ValueError(f"{redact(location)} is not on the local disk")
    return os.path.abspath(location) if not is_uri(location) else unquote(urlsplit(location).path)


def mirror_root() -> str:
    """Where local copies of remote run folders go: $RETRO_DIST_MIRROR, else
    $XDG_CACHE_HOME/retro_dist/mirror (default ~/.cache/retro_dist/mirror)."""
    if os.environ.get("RETRO_DIST_MIRROR"):
        return os.path.abspath(os.environ["RETRO_DIST_MIRROR"])
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "retro_dist", "mirror")


def local_mirror(location: str) -> str:
    """A local folder standing for `location`: the location itself when it is local, else
    <mirror_root>/<scheme>/<endpoint>/<bucket>/<path> (no credentials) for what must stay on a
    local disk (logs, TensorBoard, downloaded checkpoints)."""
    if is_local(location):
        return local_path(location)
    parts = urlsplit(location)
    host = parts.netloc.rsplit("@", 1)[-1]
    endpoint = parse_qs(parts.query).get("endpoint_override", ["default"])[-1]
    return os.path.join(mirror_root(), parts.scheme, endpoint.replace(":", "_").replace("/", "_"),
                        host, unquote(parts.path).strip("/"))


def is_empty(location: str) -> bool:
    """Whether nothing exists at or under `location` (a missing folder is empty)."""
    fs, path = open_location(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return False
    if info.type == pafs.FileType.NotFound:  # object stores: no object under the prefix
        return True
    found = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    return not found


def open_location(location: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a bare path, `file://` or `s3://` URI.

    A bare path is made absolute (not resolved: symlinks stay as given). Other schemes go
    to pyarrow's own `FileSystem.from_uri`.
    """
    if not is_uri(location):
        return pafs.LocalFileSystem(), os.path.abspath(location)
    parts = urlsplit(location)
    if parts.scheme == "file":
        return pafs.LocalFileSystem(), unquote(parts.path) or "/"
    if parts.scheme in _S3_SCHEMES:
        return _s3(parts)
    return pafs.FileSystem.from_uri(location)


def _s3(parts) -> tuple[pafs.FileSystem, str]:
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"  # never contact 169.254.169.254
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    unknown = set(query) - {"endpoint_override", "scheme", "region"}
    if unknown:
        raise ValueError(f"s3 location: unknown query parameter(s) {sorted(unknown)}")
    key = unquote(parts.username or "") or os.environ.get("AWS_ACCESS_KEY_ID")
    secret = unquote(parts.password or "") or os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not key or not secret:
        raise ValueError("s3 location: needs explicit credentials (s3://KEY:SECRET@bucket/... "
                         "or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)")
    fs = pafs.S3FileSystem(access_key=key, secret_key=secret,
                           endpoint_override=query.get("endpoint_override"),
                           scheme=query.get("scheme", "https"),
                           region=query.get("region", "us-east-1"),
                           allow_bucket_creation=True)
    bucket = parts.hostname or ""
    if not bucket:
        raise ValueError(f"s3 location {parts.geturl()!r}: no bucket")
    return fs, f"{bucket}{parts.path}".rstrip("/")


def fsync_path(path: str, directory: bool = False) -> None:
    """fsync one local file (or a directory's entries after a rename) by path."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_once(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Put `data` at `path` so readers see the old file or the new one, never a mix.

    Local disk: temp file, fsync, rename, fsync of the directory. Anything else: one write
    of the final name (an object PUT is atomic; there is no rename to rely on).
    """
    if not isinstance(fs, pafs.LocalFileSystem):
        with fs.open_output_stream(path, compression=None) as out:
            out.write(data)
        return
    tmp = path + TMP_SUFFIX
    with fs.open_output_stream(tmp, compression=None) as out:
        out.write(data)
    fsync_path(tmp)
    fs.move(tmp, path)
    fsync_path(os.path.dirname(path) or ".", directory=True)


def write_file_once(location: str, data: bytes) -> None:
    """write_once at a path or URI, creating its parent directory (a no-op on object stores)."""
    fs, path = open_location(location)
    parent = path.rsplit("/", 1)[0]
    if parent and parent != path:
        fs.create_dir(parent, recursive=True)
    write_once(fs, path, data)


def read_file(location: str) -> bytes:
    """The whole file at a path or URI (one GET on an object store)."""
    fs, path = open_location(location)
    with fs.open_input_stream(path, compression=None) as f:
        return f.read()


def exists(location: str) -> bool:
    fs, path = open_location(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


__all__ = ["is_uri", "is_local", "join", "open_location", "write_once", "write_file_once",
           "read_file", "exists", "fsync_path", "redact", "local_path", "local_mirror",
           "mirror_root", "is_empty"]
