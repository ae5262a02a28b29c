"""Where files live: local paths and ``s3://`` URIs behind one pyarrow filesystem.

Credentials never pass through the config: pyarrow's S3 filesystem takes them from the
standard AWS chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``,
``~/.aws``, instance roles), so nothing secret is printed, logged or saved with a run. The
config only says where the endpoint is (``s3.endpoint_url`` for MinIO or other S3-compatible
servers), which region, and whether to read anonymously.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator
from urllib.parse import urlparse

import pyarrow.fs as pafs

from .config import S3Config
from .runtime.console import one_line


def filesystem_for(uri: str, s3: S3Config | None = None, attempts: int = 3) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path inside it)`` for a local path or a URI (``s3://bucket/key``, …);
    ``attempts``: tries of each S3 request (the AWS SDK backs off exponentially, up to 20 s)."""
    if uri.startswith("s3://"):
        s3 = s3 or S3Config()
        options: dict = {}
        if s3.endpoint_url:
            endpoint = urlparse(s3.endpoint_url)
            options["endpoint_override"] = endpoint.netloc or endpoint.path
            options["scheme"] = endpoint.scheme or "https"
        if s3.region:
            options["region"] = s3.region
        if s3.anonymous:
            options["anonymous"] = True
        return RetryingS3FileSystem(attempts, **options), uri[len("s3://"):].rstrip("/")
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


class RetryingS3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3 filesystem that keeps its number of tries when pickled (to Ray's workers and
    Ray Train's controller): pyarrow's own drops the retry strategy and comes back with 3."""

    def __init__(self, attempts: int = 3, **options):
        super().__init__(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts), **options)
        self.attempts, self.options = attempts, options

    def __reduce__(self):
        return _retrying_s3, (self.attempts, self.options)


def _retrying_s3(attempts: int, options: dict) -> RetryingS3FileSystem:
    return RetryingS3FileSystem(attempts, **options)


def display_uri(uri_or_path: str, filesystem: pafs.FileSystem) -> str:
    """A path inside ``filesystem`` as users write it (``s3://…`` for S3)."""
    if isinstance(filesystem, pafs.S3FileSystem) and not uri_or_path.startswith("s3://"):
        return f"s3://{uri_or_path}"
    return uri_or_path


def exists(filesystem: pafs.FileSystem, path: str) -> bool:
    try:
        return filesystem.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as err:  # an unreachable endpoint, a missing bucket, denied access
        raise FileNotFoundError(f"cannot reach {display_uri(path, filesystem)}: {one_line(err, 200)}") from None


def write_text_atomically(filesystem: pafs.FileSystem, path: str, text: str) -> None:
    write_bytes_atomically(filesystem, path, text.encode())


def write_bytes_atomically(filesystem: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write, then move into place: a crash never leaves half a file under the final name."""
    parent = path.rsplit("/", 1)[0]
    filesystem.create_dir(parent, recursive=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with filesystem.open_output_stream(tmp) as stream:
        stream.write(data)
    filesystem.move(tmp, path)


def read_text(filesystem: pafs.FileSystem, path: str) -> str:
    with filesystem.open_input_stream(path) as stream:
        return stream.read().decode()


GLOB_CHARACTERS = "*?["


def list_files(filesystem: pafs.FileSystem, path: str, extension: str) -> list[str]:
    """The ``extension`` files of a folder (searched recursively), of a glob (``*``, ``?``,
    ``[…]``; ``*`` also crosses ``/``), or the one file ``path`` names; sorted. Inside a folder or
    below a glob's fixed part, names that start with ``_`` or ``.`` are skipped: they hold a job's
    bookkeeping (as in Spark and Ray Data), such as a filter's scores.

    Raises:
        FileNotFoundError: nothing matches (one line).
    """
    import fnmatch

    if any(c in path for c in GLOB_CHARACTERS):
        first = min(path.index(c) for c in GLOB_CHARACTERS if c in path)
        base = path[:first].rsplit("/", 1)[0] if "/" in path[:first] else ""
        infos = filesystem.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        files = sorted(i.path for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatchcase(i.path, path)
                       and not _hidden(i.path[len(base):]))
    elif filesystem.get_file_info(path).type == pafs.FileType.Directory:
        infos = filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
        files = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(f".{extension}")
                       and not _hidden(i.path[len(path.rstrip("/")):]))
    else:
        files = [path] if filesystem.get_file_info(path).type == pafs.FileType.File else []
    if not files:
        raise FileNotFoundError(f"no .{extension} files at {display_uri(path, filesystem)}")
    return files


def _hidden(relative: str) -> bool:
    return any(part.startswith(("_", ".")) for part in relative.strip("/").split("/"))


def newest_folder(filesystem: pafs.FileSystem, path: str, prefix: str, containing: str | None = None) -> str | None:
    """The folder directly under ``path`` whose name starts with ``prefix`` and sorts last —
    the newest, for names that carry their start time (``checkpoint_<timestamp>``,
    ``tune-<timestamp>``) — optionally only among folders holding the file ``containing``;
    None when there is none."""
    entries = filesystem.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    names = sorted(e.path for e in entries if e.type == pafs.FileType.Directory and e.base_name.startswith(prefix))
    if containing is not None:
        names = [n for n in names if filesystem.get_file_info(f"{n}/{containing}").type != pafs.FileType.NotFound]
    return names[-1] if names else None


def is_empty_folder(filesystem: pafs.FileSystem, path: str) -> bool:
    """True when nothing is at ``path`` or it is a folder with nothing in it."""
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return True
    return info.type == pafs.FileType.Directory and not filesystem.get_file_info(pafs.FileSelector(path))


def staging_beside(path: str) -> str:
    """A fresh folder name next to ``path`` to build its replacement in (never inside it)."""
    import uuid

    return f"{path.rstrip('/')}.staging-{uuid.uuid4().hex[:8]}"


@contextmanager
def built_beside(filesystem: pafs.FileSystem, target: str) -> Iterator[str]:
    """A fresh folder beside ``target`` to build its replacement in; on leaving the block it is
    swapped in (`replace_folder`), or, when the block fails, removed: ``target`` stays as it was."""
    staging = staging_beside(target)
    try:
        yield staging
        replace_folder(filesystem, staging, target)
    except BaseException:
        if filesystem.get_file_info(staging).type != pafs.FileType.NotFound:
            filesystem.delete_dir(staging)
        raise


def replace_folder(filesystem: pafs.FileSystem, staging: str, target: str) -> None:
    """Put the finished folder ``staging`` at ``target``, replacing whatever was there.

    Locally two renames do it (the old folder aside, the new one in, then the old one deleted),
    so a crash leaves a whole folder at ``target`` or beside it, never a mix. Object stores have
    no rename: the old files are deleted, then the new ones moved in one by one.
    """
    if isinstance(filesystem, pafs.LocalFileSystem):
        import shutil

        aside = None
        if os.path.lexists(target):
            aside = f"{target.rstrip('/')}.replaced-{os.getpid()}"
            os.replace(target, aside)
        os.replace(staging, target)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        return
    if filesystem.get_file_info(target).type != pafs.FileType.NotFound:
        filesystem.delete_dir(target)
    for info in filesystem.get_file_info(pafs.FileSelector(staging, recursive=True)):
        if info.type == pafs.FileType.File:
            destination = f"{target}/{info.path[len(staging):].lstrip('/')}"
            filesystem.create_dir(destination.rsplit("/", 1)[0], recursive=True)
            filesystem.move(info.path, destination)
    filesystem.delete_dir(staging)
