"""Where a run's files live: a local folder, an NFS mount, or any pyarrow filesystem URI.

Every stage that reads or writes run files goes through these few functions, so the same code
works on one machine and on a cluster whose nodes share nothing but object storage
(`s3://bucket/run`, `gs://…`, `abfs://…`; credentials come from the environment, the way
pyarrow reads them, and are never logged).

Writes are atomic: a local file is written to a temporary name and renamed (optionally
fsynced, file and folder), an object is one PUT. A reader never sees half a file.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pyarrow.fs as pafs

# Filesystem types that several machines can mount (a path on one of them is shared storage).
NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "ceph", "glusterfs",
              "beegfs", "fuse.s3fs", "fuse.gcsfuse", "fuse.juicefs", "fuse.sshfs", "9p",
              "virtiofs", "efs")


def is_uri(location: str) -> bool:
    return "://" in location


def normalize(location: str) -> str:
    """Local paths made absolute (a Ray actor may run in another working directory)."""
    return location if is_uri(location) else os.path.abspath(os.path.expanduser(location))


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local folder or a URI (s3://, gs://, file://, …)."""
    if not is_uri(location):
        return pafs.LocalFileSystem(), normalize(location)
    return pafs.FileSystem.from_uri(location)


def is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type == pafs.FileType.File


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[str]:
    """A temporary path beside local file `path`, renamed over it when the block ends
    without an exception (removed otherwise): readers see the old file or the whole new
    one, never half of it."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex[:6]}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes, *, sync: bool = False) -> None:
    """Write `path` atomically. `sync`: also survive power loss (fsync the file and folder)."""
    if not is_local(fs):
        with fs.open_output_stream(path) as f:  # an object PUT is atomic
            f.write(data)
        return
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        if sync:
            f.flush()
            os.fsync(f.fileno())
    if sync:
        fd = os.open(os.path.dirname(path), os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename itself
        finally:
            os.close(fd)


def list_files(fs: pafs.FileSystem, folder: str) -> list[str]:
    """Base names of the files directly in `folder` (none when it does not exist)."""
    infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.File)


def delete(fs: pafs.FileSystem, path: str) -> None:
    """Delete a file; a file already gone is fine."""
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def mount_type(path: str) -> str | None:
    """The filesystem type of the mount holding local `path` (Linux /proc/mounts), or None."""
    try:
        with open("/proc/mounts") as f:
            mounts = [line.split()[1:3] for line in f if len(line.split()) > 2]
    except OSError:
        return None
    path = os.path.realpath(path)
    best, kind = "", None
    for point, fstype in mounts:
        point = point.replace("\\040", " ")
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) > len(best):
            best, kind = point, fstype
    return kind


def is_shared(location: str) -> bool:
    """True when other machines can reach `location`: a URI, or a path on a network mount."""
    if is_uri(location):
        return not location.startswith("file://")
    path = normalize(location)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)  # the folder may not exist yet: its mount decides
    kind = mount_type(path)
    return kind is not None and (kind in NETWORK_FS or kind.startswith("fuse."))
