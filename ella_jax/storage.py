"""Where files live: local paths, gs:// and s3:// URIs, through one path type.

Every path the project reads or writes goes through `path()`, an `etils.epath.Path`: pathlib's
API over local files, and over gs:// and s3:// through fsspec's gcsfs and s3fs. epath rather
than fsspec itself because orbax already names its checkpoints with epath (the trainer and its
checkpoints share one path type) and because code keeps pathlib's shape (`folder / "unet"`,
`.read_text()`, `.is_dir()`) whatever the store.

Object stores cannot rename or append, but one object appears whole or not at all: `atomic_path`
stages an output locally and uploads each of its files once, so a reader never sees half a file
(a folder's files appear one by one). Emulators are found as the clients find them:
`STORAGE_EMULATOR_HOST` (fake-gcs-server) and `AWS_ENDPOINT_URL` (moto, MinIO).
"""

import argparse
import contextlib
import functools
import glob as local_glob
import importlib.util
import logging
import os
import pathlib
import shutil
import socket
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence

import fsspec
from etils import epath

REMOTE_SCHEMES = ("gs://", "s3://")
CLIENTS = {"gs": "gcsfs", "s3": "s3fs"}  # fsspec's implementation of each scheme
STAGING_MARK = ".staging-"  # in the names of `atomic_path`'s staging folders

# fsspec keeps bucket listings for the life of a process: a checkpoint another process wrote or
# deleted since would stay invisible (or a deleted one visible) to a resume or an export.
for _protocol in ("gs", "s3"):
    fsspec.config.conf.setdefault(_protocol, {})["use_listings_cache"] = False

# gcsfs logs each request it gives up with its traceback (tens of lines a request) before
# raising the error, which the caller names in one line. (s3fs and aiohttp log retries at
# debug level only.)
logging.getLogger("gcsfs").addFilter(lambda record: record.funcName != "retry_request")

PROBE_TIMEOUT_S = 5  # for the connection that proves a store's endpoint answers


class StorageError(OSError):
    """A path whose store cannot be reached or read; the message names the path."""


def path(location: str | os.PathLike) -> epath.Path:
    """`location` as a path: a local path, or a gs:// or s3:// URI."""
    text = os.fspath(location)
    if "://" in text and not text.startswith(REMOTE_SCHEMES):
        raise StorageError(f"{text}: only local paths, gs:// and s3:// are supported")
    if is_remote(text):
        if os.environ.get("STORAGE_EMULATOR_HOST"):
            # An emulator serves GCS's JSON API only: gcsfs's bucket-layout lookup (the control
            # API) would fail at every call, after asking for credentials, and log it.
            os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        scheme = text.split("://")[0]
        if importlib.util.find_spec(CLIENTS[scheme]) is None:
            raise StorageError(
                f"{text}: {scheme}:// paths need {CLIENTS[scheme]}: pip install 'ella-jax[cloud]'"
            )
    return epath.Path(text)


def path_argument(location: str) -> epath.Path:
    """`path` as an argparse type: its StorageError (gs:// without gcsfs, another scheme) becomes
    argparse's one-line error for the flag, where argparse would print a traceback."""
    try:
        return path(location)
    except StorageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def is_remote(location: str | os.PathLike) -> bool:
    return os.fspath(location).startswith(REMOTE_SCHEMES)


def reachable(location: str | os.PathLike) -> epath.Path:
    """`path(location)` after one request that proves its store answers: a missing bucket,
    missing credentials or an endpoint that does not answer is a StorageError naming it."""
    result = path(location)
    if is_remote(result):
        check_endpoint(result)
        try:
            result.exists()
            bucket = "/".join(os.fspath(result).split("/")[:3])
            if not epath.Path(bucket).exists():
                raise FileNotFoundError("no such bucket")
        except Exception as e:  # gcsfs, s3fs and their HTTP clients raise many types
            raise StorageError(f"{result}: cannot be opened ({_brief(e)})") from None
    return result


def glob(pattern: str) -> list[str]:
    """The sorted matches of a glob pattern (`*`, `?`, `[...]`, `**`), local or in a bucket."""
    if not is_remote(pattern):
        return sorted(local_glob.glob(pattern, recursive=True))
    scheme = pattern.split("://")[0]
    check_endpoint(pattern)
    filesystem = _filesystem(pattern)
    try:
        return sorted(f"{scheme}://{match}" for match in filesystem.glob(pattern))
    except Exception as e:  # as in `reachable`
        raise StorageError(f"{pattern}: cannot be listed ({_brief(e)})") from None


def endpoint(location: str | os.PathLike) -> str:
    """The URL that the client of a gs:// or s3:// `location` sends its requests to, found as the
    client finds it: an emulator's (`STORAGE_EMULATOR_HOST`; `AWS_ENDPOINT_URL_S3`, else
    `AWS_ENDPOINT_URL`), else the cloud's."""
    if os.fspath(location).startswith("gs://"):
        host = os.environ.get("STORAGE_EMULATOR_HOST")
        if not host:
            return "https://storage.googleapis.com"
        return host if host.startswith("http") else f"http://{host}"  # as gcsfs reads it
    configured = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if configured:
        return configured
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return f"https://s3.{region}.amazonaws.com" if region else "https://s3.amazonaws.com"


def check_endpoint(location: str | os.PathLike) -> None:
    """A StorageError naming a gs:// or s3:// `location` and its `endpoint` when a connection to
    that endpoint fails, tried once per endpoint and process and within PROBE_TIMEOUT_S: gcsfs
    and s3fs would retry each request for up to a minute and a half before failing."""
    url = endpoint(location)
    problem = _unreachable(url)
    if problem:
        raise StorageError(f"{os.fspath(location)}: cannot reach {url} ({problem})")


@functools.cache
def _unreachable(url: str) -> str | None:
    """Why a TCP connection to the host and port of `url` fails (None: it opens)."""
    parts = urllib.parse.urlsplit(url)
    if not parts.hostname:
        return "not a URL"
    if urllib.request.getproxies().get(parts.scheme) and not urllib.request.proxy_bypass(
        parts.hostname
    ):
        return None  # the client connects through the proxy: a direct connection proves nothing
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        socket.create_connection((parts.hostname, port), timeout=PROBE_TIMEOUT_S).close()
    except TimeoutError:
        return f"no answer in {PROBE_TIMEOUT_S} s"
    except OSError as e:  # a name that does not resolve, a refused connection, ...
        return e.strerror or str(e)
    except ValueError as e:  # a port out of range
        return str(e)
    return None


def read_text(location: str | os.PathLike, encoding: str = "utf-8") -> str:
    """The text of a file (local or in a bucket); bytes that are not `encoding` (a Latin-1 or
    binary file) are a StorageError naming the file, the line and the byte."""
    data = path(location).read_bytes()
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise StorageError(
            f"{location}:{line}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}): "
            "save the file as UTF-8"
        ) from None


def version(location: str | os.PathLike) -> str:
    """A string that changes whenever the file at `location` does: its size and modification
    time in nanoseconds locally, a hash of the store's record of the object in a bucket (with
    its ETag or generation)."""
    if is_remote(location):
        return str(_filesystem(location).ukey(os.fspath(location)))
    stat = os.stat(location)
    return f"{stat.st_size}:{stat.st_mtime_ns}"


@contextlib.contextmanager
def atomic_path(destination: str | os.PathLike, overwrite: bool = False) -> Iterator[pathlib.Path]:
    """Yields a local temporary path to write a file or a folder to; when the block succeeds it
    replaces `destination` (local or remote), and on any exception nothing is left behind.

    Local: staged beside `destination` (a symbolic link's target; "." the working directory)
    and renamed into place. An existing folder stays (its mode, and the links to it): the
    staged entries replace its entries of the same names, then its others are removed. A
    staging folder that a killed process left is removed by the next write beside it. Remote:
    each file is uploaded as one object (an existing destination is removed first).
    """
    destination = path(destination)
    remote = is_remote(destination)
    if not remote:
        destination = epath.Path(os.path.realpath(destination))
    if destination.exists() and not overwrite:
        raise FileExistsError(f"{destination}: already exists (pass --overwrite to replace it)")
    folder = None
    if not remote:
        folder = destination.parent
        folder.mkdir(parents=True, exist_ok=True)
        _remove_abandoned_staging(destination)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=_staging_prefix(destination), dir=folder))
    temporary = staging / destination.name
    try:
        yield temporary
        give_umask_modes(temporary)
        if remote:
            _upload(temporary, destination)
        elif temporary.is_dir() and destination.is_dir():
            _replace_entries(pathlib.Path(destination), temporary)
        else:
            _remove(pathlib.Path(destination))
            os.replace(temporary, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def is_staging(name: str) -> bool:
    """Whether `name` is that of a staging folder `atomic_path` makes (hidden, left only by a
    killed process)."""
    return name.startswith(".") and STAGING_MARK in name


def overlap(first: str | os.PathLike, second: str | os.PathLike) -> bool:
    """Whether two locations are the same, or one holds the other (local paths resolved, so a
    symbolic link and its target, or "." and the working directory, are the same)."""

    def parts(location: str | os.PathLike) -> tuple[str, ...]:
        text = os.fspath(location)
        return pathlib.PurePosixPath(text if is_remote(text) else os.path.realpath(text)).parts

    a, b = parts(first), parts(second)
    shorter = min(len(a), len(b))
    return a[:shorter] == b[:shorter]


def _staging_prefix(destination: epath.Path) -> str:
    """The name of `destination`'s staging folders up to this process's id: the host and the
    process make it findable and removable once that process is gone."""
    return f".{destination.name}{STAGING_MARK}{socket.gethostname()}-{os.getpid()}-"


def _remove_abandoned_staging(destination: epath.Path) -> None:
    """Removes the staging folders of `destination` that processes of this host, now gone,
    left (a SIGKILL skips every cleanup)."""
    prefix = f".{destination.name}{STAGING_MARK}{socket.gethostname()}-"
    for entry in pathlib.Path(destination.parent).glob(f"{local_glob.escape(prefix)}*"):
        pid = entry.name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def _replace_entries(folder: pathlib.Path, staged: pathlib.Path) -> None:
    """Makes `folder` hold what `staged` holds, keeping `folder` itself: entry by entry, each
    renamed over its old namesake, then the entries `staged` did not have removed."""
    names = set()
    for entry in sorted(staged.iterdir()):
        names.add(entry.name)
        _remove(folder / entry.name)  # a rename cannot replace a folder
        os.replace(entry, folder / entry.name)
    for entry in folder.iterdir():
        if entry.name not in names:
            _remove(entry)


def _remove(location: pathlib.Path) -> None:
    """Removes a file, link or folder, if there is one."""
    if location.is_dir() and not location.is_symlink():
        shutil.rmtree(location)
    elif location.exists() or location.is_symlink():
        location.unlink()


def give_umask_modes(staged: str | os.PathLike) -> None:
    """The modes a plain `open` or `mkdir` would give, to a staged file or folder and all it
    holds: writers such as safetensors create their files 0600, and the staging folder is
    private, so an output would otherwise be unreadable to the group and others."""
    staged = pathlib.Path(staged)
    umask = os.umask(0)
    os.umask(umask)
    for item in [staged, *staged.rglob("*")] if staged.is_dir() else [staged]:
        if item.exists() and not item.is_symlink():
            item.chmod((0o777 if item.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def local_copy(folder: str | os.PathLike, names: Sequence[str]) -> Iterator[epath.Path]:
    """A local folder holding the files `names` of `folder` that exist (`folder` itself when
    local; a temporary download, removed afterwards, when remote), for libraries that open
    local files only."""
    source = path(folder)
    if not is_remote(source):
        yield source
        return
    check_endpoint(source)
    with tempfile.TemporaryDirectory() as staging:
        try:
            filesystem = _filesystem(source)
            for name in names:
                if (source / name).is_file():
                    filesystem.get_file(os.fspath(source / name), os.path.join(staging, name))
        except Exception as e:  # as in `reachable`
            raise StorageError(f"{source}: cannot be read ({_brief(e)})") from None
        yield epath.Path(staging)


def _upload(local: pathlib.Path, destination: epath.Path) -> None:
    filesystem = _filesystem(destination)
    if destination.exists():
        filesystem.rm(os.fspath(destination), recursive=True)
    if local.is_dir():
        for file in sorted(local.rglob("*")):
            if file.is_file():
                relative = file.relative_to(local)
                filesystem.put_file(os.fspath(file), f"{destination}/{relative}")
    else:
        filesystem.put_file(os.fspath(local), os.fspath(destination))


def _filesystem(location: str | os.PathLike) -> fsspec.AbstractFileSystem:
    return fsspec.core.url_to_fs(os.fspath(location))[0]


def _brief(error: Exception) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:300]
