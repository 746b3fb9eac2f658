"""Caches (trained victims, trained generators) on a local folder or any pyarrow URI.

A cached model is a folder of files with one marker file that says it is complete
(`model.json` for a checkpoint, `model_index.json` for a diffusers folder). On object storage
the writer builds the folder locally and `publish`es it, marker last; every reader asks
`local_copy` for a local folder, which for a URI is a mirror downloaded once per process.
A folder whose marker is missing (still being published, or a publish that died) is never
used, and a mirror is renamed into place only once it is whole.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from aspkd_ray import storage

_LOCK = threading.Lock()
_MIRRORS: dict[str, Path] = {}  # location -> this process's downloaded copy
_ROOT: Path | None = None  # this process's mirror folder (a fresh one: nothing stale in it)


def join(location: str, *names: str) -> str:
    """`location`/`names` for a local path or a URI (pathlib would fold `s3://` to `s3:/`)."""
    if storage.is_uri(location):
        return "/".join([location.rstrip("/"), *names])
    return str(Path(location, *names))


def exists(location: str, marker: str) -> bool:
    """Whether `location` holds `marker` (the file written last: the folder is complete)."""
    fs, path = storage.resolve(location)
    return storage.exists(fs, f"{path.rstrip('/')}/{marker}")


def any_files(location: str) -> bool:
    """Whether `location` holds anything at all (to tell 'missing' from 'incomplete')."""
    fs, path = storage.resolve(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return True
    return bool(fs.get_file_info(pafs.FileSelector(path, recursive=True,
                                                   allow_not_found=True)))


def local_copy(location: str | Path, marker: str | None = None) -> Path:
    """A local folder with the files of `location`: a local path is returned as it is; a URI
    is downloaded once per process (its `marker` must be there, else FileNotFoundError)."""
    location = str(location)
    if not storage.is_uri(location):
        return Path(location)
    with _LOCK:  # one download per location, even with several threads asking at once
        if location in _MIRRORS and _MIRRORS[location].is_dir():
            return _MIRRORS[location]
        if marker and not exists(location, marker):
            raise FileNotFoundError(
                f"{location} has no {marker}: nothing is there, or it was only partly "
                f"published (the marker is written last). Train it again with the same "
                f"config (it is published there), or point the config at a complete copy.")
        dest = mirror_path(location)
        _download(location, dest)
        _MIRRORS[location] = dest
        return dest


def publish(local_folder: str | Path, location: str, marker: str) -> None:
    """Upload every file of `local_folder` (sub-folders too) to `location`, each atomically,
    `marker` last: a reader that sees the marker sees the whole folder."""
    src = Path(local_folder)
    if not (src / marker).is_file():
        raise FileNotFoundError(f"{src / marker} not found: {src} is not a complete folder to "
                                f"publish (its marker {marker} is missing).")
    fs, root = storage.resolve(location)
    files = sorted(p for p in src.rglob("*") if p.is_file())
    for p in [p for p in files if p != src / marker] + [src / marker]:
        rel = p.relative_to(src).as_posix()
        storage.write_bytes(fs, f"{root.rstrip('/')}/{rel}", p.read_bytes())
    with _LOCK:
        _MIRRORS.pop(location, None)  # this process wrote a new version: download it again


def mirror_path(location: str) -> Path:
    """Where this process keeps (or will keep) its copy of URI `location`: a folder of the
    same base name, so that names derived from the folder match the location's."""
    key = hashlib.sha256(location.encode()).hexdigest()[:16]
    return _mirror_root() / key / (location.rstrip("/").rsplit("/", 1)[-1] or "root")


def forget() -> None:
    """Drop this process's mirrors (the next `local_copy` downloads again); for tests."""
    with _LOCK:
        for folder in _MIRRORS.values():
            shutil.rmtree(folder.parent, ignore_errors=True)
        _MIRRORS.clear()


def _mirror_root() -> Path:
    global _ROOT
    if _ROOT is None or not _ROOT.is_dir():
        _ROOT = Path(tempfile.mkdtemp(prefix=f"aspkd-cache-{os.getpid()}-"))
    return _ROOT


def _download(location: str, dest: Path) -> None:
    """Copy every file under `location` to `dest`: into a temporary folder, renamed when whole."""
    fs, root = storage.resolve(location)
    root = root.rstrip("/")
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    files = [i.path for i in infos if i.type == pafs.FileType.File]
    if not files:
        raise FileNotFoundError(f"{location} holds no files; train it first (same config) or "
                                f"point the config at an existing copy.")
    home = dest.parent  # <mirror root>/<key>: renamed into place when whole
    part = home.with_name(f"{home.name}.{uuid.uuid4().hex[:6]}.part")
    try:
        for path in files:
            target = part / dest.name / path[len(root):].lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(storage.read_bytes(fs, path))
        if home.exists():
            shutil.rmtree(home)
        os.replace(part, home)
    finally:
        shutil.rmtree(part, ignore_errors=True)
