"""Datasets as folders and archives: finding the data file in a folder, and unpacking .zip / .tar / .tar.gz
archives with checks on paths, links, member count and size.
"""

from __future__ import annotations

import gzip
import lzma
import os
import re
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import IO

from dama_engine.data.images import WINDOWS_DRIVE
from dama_engine.data.lines import DataFormatError, DataLimitError
from dama_engine.data.validation import DataLimits
from dama_settings.names import DATA_FILE_SUFFIXES

DATA_SUFFIXES = DATA_FILE_SUFFIXES  # the API accepts the same (dama_settings.names)
_COPY_CHUNK = 1 << 20


def find_data_file(folder: Path) -> Path:
    """The one data file in ``folder`` (the shallowest; hidden files and ``__MACOSX`` are ignored)."""
    found: list[Path] = []
    for directory, subdirectories, files in os.walk(folder):
        subdirectories[:] = sorted(name for name in subdirectories if not _hidden(name))
        found += [Path(directory, name) for name in files if not _hidden(name) and _is_data_file(name)]
    if not found:
        raise DataFormatError(f"no data file ({', '.join(DATA_SUFFIXES)}) found in the dataset folder")
    depth = min(len(candidate.relative_to(folder).parts) for candidate in found)
    shallowest = sorted(candidate for candidate in found if len(candidate.relative_to(folder).parts) == depth)
    if len(shallowest) > 1:
        names = ", ".join(str(candidate.relative_to(folder)) for candidate in shallowest)
        raise DataFormatError(f"several data files in the dataset folder ({names}); keep one or pass the file itself")
    return shallowest[0]


def _hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def _is_data_file(name: str) -> bool:
    return Path(name).suffix.lower() in DATA_SUFFIXES


# ---------------------------------------------------------------------------------------------------------------
# Archives


def archive_kind(path: Path) -> str | None:
    """``"zip"`` or ``"tar"`` (any compression tarfile reads) by content, else None."""
    if zipfile.is_zipfile(path):
        return "zip"
    try:
        return "tar" if tarfile.is_tarfile(path) else None
    except (OSError, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError):
        return None


def extract_archive(archive: Path, dest: Path, *, limits: DataLimits) -> None:
    """Unpack ``archive`` into the empty folder ``dest``, refusing anything that could escape it or exhaust the disk.

    Refused: absolute member paths, ``..`` components, symbolic and hard links, device files, encrypted members,
    more than ``limits.max_archive_members`` members or ``limits.max_archive_bytes`` unpacked bytes (counted while
    writing, not trusted from headers).
    """
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise DataFormatError(f"the folder to unpack into is not empty: {dest}")
    kind = archive_kind(archive)
    try:
        if kind == "zip":
            _extract_zip(archive, dest, limits)
        elif kind == "tar":
            _extract_tar(archive, dest, limits)
        else:
            raise DataFormatError(f"{archive.name} is not a zip or tar archive")
    except (FileExistsError, NotADirectoryError, IsADirectoryError) as error:
        raise DataFormatError(
            f"archive members conflict (a duplicate name, or a file and a folder): {error}"
        ) from error


def _member_parts(name: str) -> tuple[str, ...]:
    if name.startswith(("/", "\\")) or WINDOWS_DRIVE.match(name):
        raise DataFormatError(f"archive member {name!r} has an absolute path; members must be relative")
    parts = tuple(part for part in re.split(r"[/\\]", name) if part not in ("", "."))
    if ".." in parts:
        raise DataFormatError(f"archive member {name!r} contains '..'; members must stay inside the archive")
    if any("\x00" in part for part in parts):
        raise DataFormatError(f"archive member {name!r} has a NUL character in its name")
    return parts


def _too_many_bytes(limits: DataLimits, declared: int | None = None) -> DataLimitError:
    size = f"{declared} bytes, over" if declared is not None else "more than"
    message = f"the archive unpacks to {size} max_archive_bytes={limits.max_archive_bytes} bytes"
    return DataLimitError(message, limit="max_archive_bytes")


def _too_many_members(limits: DataLimits, count: int | None = None) -> DataLimitError:
    counted = f"{count} members, over" if count is not None else "more members than"
    message = f"the archive has {counted} max_archive_members={limits.max_archive_members}"
    return DataLimitError(message, limit="max_archive_members")


def _copy_member(source: IO[bytes], target: Path, remaining: int, limits: DataLimits) -> int:
    """Write one member (every byte counted against ``remaining``, not trusted from headers). An empty member is
    not written: no row can use it (an empty image does not decode, an empty data file has no rows), and skipping
    it keeps an archive of many empty members cheap."""
    first = source.read(_COPY_CHUNK)
    if not first:
        return 0
    target.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with target.open("xb") as out:
        chunk = first
        while chunk:
            written += len(chunk)
            if written > remaining:
                raise _too_many_bytes(limits)
            out.write(chunk)
            chunk = source.read(_COPY_CHUNK)
    return written


def _extract_zip(archive: Path, dest: Path, limits: DataLimits) -> None:
    try:
        with zipfile.ZipFile(archive) as bundle:
            members = bundle.infolist()
            if len(members) > limits.max_archive_members:
                raise _too_many_members(limits, len(members))
            declared = sum(member.file_size for member in members)
            if declared > limits.max_archive_bytes:
                raise _too_many_bytes(limits, declared)
            remaining = limits.max_archive_bytes
            for member in members:
                parts = _member_parts(member.filename)
                mode = member.external_attr >> 16
                if stat.S_ISLNK(mode):
                    raise DataFormatError(f"archive member {member.filename!r} is a link; links are not allowed")
                if member.flag_bits & 0x1:
                    raise DataFormatError(f"archive member {member.filename!r} is encrypted")
                if not parts:
                    continue
                target = dest.joinpath(*parts)
                if member.is_dir():  # folders are made for the files in them: empty ones are of no use
                    continue
                if stat.S_IFMT(mode) not in (0, stat.S_IFREG):
                    raise DataFormatError(f"archive member {member.filename!r} is not a regular file")
                if member.file_size == 0:  # zipfile reads no more than declared: an empty member stays empty
                    continue
                with bundle.open(member) as source:
                    remaining -= _copy_member(source, target, remaining, limits)
    except (zipfile.BadZipFile, zlib.error, NotImplementedError, EOFError) as error:
        raise DataFormatError(f"{archive.name} is not a readable zip archive: {error}") from error


def _extract_tar(archive: Path, dest: Path, limits: DataLimits) -> None:
    try:
        with tarfile.open(archive, "r:*") as bundle:
            count = 0
            remaining = limits.max_archive_bytes
            for member in bundle:  # streamed: the limits stop a bomb before it is all read
                count += 1
                if count > limits.max_archive_members:
                    raise _too_many_members(limits)
                parts = _member_parts(member.name)
                if member.issym() or member.islnk():
                    raise DataFormatError(f"archive member {member.name!r} is a link; links are not allowed")
                if member.isdir():
                    continue
                if not member.isfile():
                    raise DataFormatError(f"archive member {member.name!r} is not a regular file")
                if member.size > remaining:
                    raise _too_many_bytes(limits)
                if not parts or member.size == 0:
                    continue
                source = bundle.extractfile(member)
                if source is None:
                    continue
                with source:
                    remaining -= _copy_member(source, dest.joinpath(*parts), remaining, limits)
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile) as error:
        raise DataFormatError(f"{archive.name} is not a readable tar archive: {error}") from error
