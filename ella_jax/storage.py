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

import contextlib
import glob as local_glob
import importlib.util
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator, Sequence

import fsspec
from etils import epath

REMOTE_SCHEMES = ("gs://", "s3://")
CLIENTS = {"gs": "gcsfs", "s3": "s3fs"}  # fsspec's implementation of each scheme

# fsspec keeps bucket listings for the life of a process: a checkpoint another process wrote or
# deleted since would stay invisible (or a deleted one visible) to a resume or an export.
for _protocol in ("gs", "s3"):
    fsspec.config.conf.setdefault(_protocol, {})["use_listings_cache"] = False


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


def is_remote(location: str | os.PathLike) -> bool:
    return os.fspath(location).startswith(REMOTE_SCHEMES)


def reachable(location: str | os.PathLike) -> epath.Path:
    """`path(location)` after one request that proves its store answers: a missing bucket,
    missing credentials or an endpoint that does not answer is a StorageError naming it."""
    result = path(location)
    if is_remote(result):
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
    filesystem = _filesystem(pattern)
    try:
        return sorted(f"{scheme}://{match}" for match in filesystem.glob(pattern))
    except Exception as e:  # as in `reachable`
        raise StorageError(f"{pattern}: cannot be listed ({_brief(e)})") from None


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

    Local: a rename in the same folder. Remote: each file is uploaded as one object (an existing
    destination is removed first).
    """
    destination = path(destination)
    if destination.exists() and not overwrite:
        raise FileExistsError(f"{destination}: already exists (pass --overwrite to replace it)")
    remote = is_remote(destination)
    if not remote:
        destination.parent.mkdir(parents=True, exist_ok=True)
    folder = None if remote else destination.parent
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=folder))
    temporary = staging / destination.name
    try:
        yield temporary
        give_umask_modes(temporary)
        if remote:
            _upload(temporary, destination)
        else:
            if destination.is_dir():
                shutil.rmtree(destination)
            os.replace(temporary, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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
