"""What ingest stores: the source images of an ImageFolder tree, one task per key, and the stored file's name.

Decisions:

- **Classes** are the sorted sub-folders of the source root, as torchvision's ImageFolder has them; a file beside
  them is skipped. **Keys** are the source path under the root without its extension (``cat/0001``); two sources
  with one key keep the first (sorted) and skip the other, named.
- **Every skipped file or folder is named with its reason**: an unsupported extension, a name that is not valid
  UTF-8 (old archives), an unreadable or empty file, a folder that cannot be listed, a folder reached a second time
  through a symbolic link (a link loop would otherwise store the same images again, under other classes).
- **Stored names** keep unicode but not characters that break a file system or a URL (``\\ / : * ? " < > | # %``,
  controls) in the class folder or the file name; a name that had to change, is too long or collides
  case-insensitively gets a hash of what it stands for, so each maps to one stable name.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from dynres.io.format import IMAGES

# the extensions torchvision's ImageFolder accepts (case-insensitive)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
UNSAFE = set('\\/:*?"<>|#%') | {chr(c) for c in range(32)} | {"\x7f"}
MAX_NAME_BYTES = 150  # file-name limits are 255 bytes; leave room for a hash suffix and temporaries


@dataclass(frozen=True)
class Task:
    key: str
    source: str  # relative to SRC, posix
    source_abs: str
    source_size: int
    source_mtime_ns: int
    label: int
    class_name: str
    path: str  # relative to STORE, posix


def plan(src: Path) -> tuple[list[str], list[Task], list[tuple[str, str]]]:
    """Classes (sorted folder names, as ImageFolder), one task per key, and the files skipped up front."""
    skipped: list[tuple[str, str]] = []
    classes = []
    for entry in sorted(os.scandir(src), key=lambda e: e.name):
        if entry.is_dir():
            classes.append(entry.name)
        else:
            skipped.append((entry.name, "not inside a class folder"))
    by_key: dict[str, list[tuple[str, str, os.stat_result, int]]] = {}
    # folders by (device, inode): the root and each class folder are walked only as themselves (a link into
    # another class would label its images with this one), any other only once
    seen = {_inode(src)} | {_inode(src / cls) for cls in classes}
    for label, cls in enumerate(classes):
        for rel, abs_path, st in _files(src, src / cls, seen, skipped):
            stem, ext = os.path.splitext(rel)
            if ext.lower() not in IMG_EXTENSIONS:
                skipped.append((rel, f"unsupported extension {ext or '(none)'!r}"))
            elif not stat.S_ISREG(st.st_mode):
                skipped.append((rel, "not a regular file"))
            elif st.st_size == 0:
                skipped.append((rel, "empty file (0 bytes)"))
            else:
                by_key.setdefault(stem, []).append((rel, abs_path, st, label))
    tasks = []
    taken: dict[str, set[str]] = {}
    folders: set[str] = set()
    folder_of = {cls: safe_name(cls, cls, folders) for cls in classes}
    for key in sorted(by_key, key=lambda k: (by_key[k][0][3], k)):
        (rel, abs_path, st, label), *dups = sorted(by_key[key])
        for dup in dups:
            skipped.append((dup[0], f"duplicate key {key!r}: kept {rel}"))
        cls = classes[label]
        name = safe_name(key, key[len(cls) + 1 :], taken.setdefault(cls, set())) + ".jpg"
        path = f"{IMAGES}/{folder_of[cls]}/{name}"
        tasks.append(Task(key, rel, abs_path, st.st_size, st.st_mtime_ns, label, cls, path))
    return classes, tasks, skipped


def _files(src: Path, top: Path, seen: set[tuple[int, int]], skipped: list[tuple[str, str]]):
    """(path under ``src``, absolute path, stat) of each file under ``top``, links followed, sorted; what cannot be
    listed, read or named goes to ``skipped``."""
    def unreadable(err: OSError) -> None:
        skipped.append((_rel(err.filename, src), f"cannot list the folder: {err.strerror or err}"))

    for dirpath, dirnames, filenames in os.walk(top, followlinks=True, onerror=unreadable):
        if dirpath != str(top):
            here = _inode(Path(dirpath))
            if here in seen:  # reached again through a link: listed already, or another class's
                skipped.append((_rel(dirpath, src), "folder reached a second time through a symbolic link"))
                dirnames.clear()
                continue
            seen.add(here)
        dirnames.sort()
        for fname in sorted(filenames):
            abs_path = os.path.join(dirpath, fname)
            rel = _rel(abs_path, src)
            try:
                rel.encode("utf-8")
            except UnicodeEncodeError:
                skipped.append((rel.encode("utf-8", "replace").decode(), "file name is not valid UTF-8"))
                continue
            try:
                st = os.stat(abs_path)
            except OSError as err:
                skipped.append((rel, f"cannot read: {err.strerror or err}"))
                continue
            yield rel, abs_path, st


def _inode(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _rel(path: str, src: Path) -> str:
    return Path(path).relative_to(src).as_posix()


def safe_name(key: str, stem: str, taken: set[str]) -> str:
    """A name for ``stem`` (a file's, without extension, or a class folder's) that keeps unicode, is safe on common
    file systems and in URLs, and is unique in ``taken`` (which it joins).

    Unsafe characters (and sub-folder separators) become ``_``; a name that had to change, is too long or
    collides case-insensitively gets a hash of ``key`` appended, so every key maps to one stable name.
    """
    safe = "".join("_" if c in UNSAFE else c for c in stem).rstrip(" .")
    if safe.startswith((".", "-")) or not safe:
        safe = "_" + safe
    truncated = safe.encode()[:MAX_NAME_BYTES].decode(errors="ignore")
    if truncated != stem or truncated.casefold() in taken:
        truncated = f"{truncated}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"
    taken.add(truncated.casefold())
    return truncated
