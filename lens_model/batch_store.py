"""Where the batch job and the multi-server client write: a folder on any filesystem ``pyarrow.fs``
supports, named by a URI (``s3://bucket/run1``, ``gs://…``, ``abfs://…``, ``hdfs://…``,
``file:///data/run1``) or a local path.

The images, the manifest, resume reading and the feature cache all go through
:class:`OutputStore`, which only calls ``pyarrow.fs`` (``FileSystem.from_uri``,
``open_output_stream``, ``open_input_stream``, ``open_append_stream``, ``get_file_info``, ``move``);
credentials and endpoints are pyarrow's (environment variables, instance roles, URI query
options). Without pyarrow installed, a local path still works through the standard library; a URI
then needs ``pip install pyarrow``.

Writes never leave a half file under its final name: on an object store one PUT is atomic (the
object appears complete or not at all), elsewhere the bytes go to a temporary name beside the file
and are moved over it.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any, Optional

OBJECT_STORES = frozenset({"s3", "gcs", "abfs"})
"""``FileSystem.type_name`` of stores where one PUT is atomic and a move is a copy: written
directly, never through a temporary name."""

_FSSPEC_OBJECT_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "az", "adl"})


def _pyarrow_fs():
    """``pyarrow.fs``, or None without pyarrow (an optional extra, so it is imported on first use
    and a local folder works without it)."""
    try:
        import pyarrow.fs as pafs
    except ImportError:
        return None
    return pafs


def _base_type(fs) -> str:
    """The type of the filesystem that holds the bytes (through ``SubTreeFileSystem`` wrappers)."""
    while getattr(fs, "type_name", "") == "subtree":
        fs = fs.base_fs
    name = getattr(fs, "type_name", "")
    if name.startswith("py::fsspec+"):  # pyarrow.fs.PyFileSystem(FSSpecHandler(...))
        # the protocol may be written as a tuple: "py::fsspec+('s3', 's3a')"
        protocols = set(re.findall(r"[a-z0-9]+", name[len("py::fsspec+"):]))
        return "s3" if protocols & _FSSPEC_OBJECT_PROTOCOLS else name
    return name


class OutputStore:
    """A folder on a ``pyarrow.fs`` filesystem (or, without pyarrow, a local folder).

    ``location``: a URI (``scheme://…``) or a local path; or, with ``filesystem`` (any
    ``pyarrow.fs.FileSystem``, e.g. a ``SubTreeFileSystem``), a path inside it. Names passed to the
    methods are ``/``-separated paths relative to the folder. The store is picklable when its
    filesystem is (pyarrow's S3/GCS/local ones are), so Ray actors may receive it.
    """

    def __init__(self, location: str | os.PathLike, filesystem: Any = None):
        text = os.fspath(location)
        pafs = _pyarrow_fs()
        if filesystem is not None:
            self.fs, self.root = filesystem, text.rstrip("/")
        elif "://" in text:
            if pafs is None:
                raise ValueError(f"{text!r} is a URI: install pyarrow (pip install pyarrow) to write "
                                 "there, or give a local folder")
            try:
                self.fs, root = pafs.FileSystem.from_uri(text)
            except Exception as e:  # ArrowInvalid / OSError from pyarrow: name the location
                raise ValueError(f"{text!r}: not a location pyarrow can open ({e})") from None
            self.root = root.rstrip("/")
        else:
            path = Path(text).expanduser().resolve()
            self.fs = pafs.LocalFileSystem() if pafs is not None else None
            self.root = path.as_posix()
        self.location = text
        self.atomic_put = _base_type(self.fs) in OBJECT_STORES if self.fs is not None else False
        self._can_append = not self.atomic_put

    def __repr__(self) -> str:
        return f"OutputStore({self.location!r})"

    def __str__(self) -> str:
        return self.location

    # ---------------------------------------------------------------------------------- names

    def path(self, name: str = "") -> str:
        """The filesystem path of ``name``."""
        if not name:
            return self.root
        return f"{self.root}/{name}" if self.root else name

    def local_path(self, name: str = "") -> Optional[Path]:
        """``name`` as a local path when the store is on the local disk, else None."""
        if self.fs is None or getattr(self.fs, "type_name", "") == "local":
            return Path(self.path(name))
        return None

    def child(self, name: str) -> "OutputStore":
        """The store of the sub-folder ``name`` (same filesystem)."""
        sub = OutputStore.__new__(OutputStore)
        sub.__dict__.update(self.__dict__)
        sub.root, sub.location = self.path(name), f"{self.location.rstrip('/')}/{name}"
        return sub

    # ------------------------------------------------------------------------------- reading

    def size(self, name: str) -> Optional[int]:
        """Size in bytes of file ``name``, None when there is none."""
        if self.fs is None:
            p = Path(self.path(name))
            return p.stat().st_size if p.is_file() else None
        info = self.fs.get_file_info(self.path(name))
        return info.size if info.type == _pyarrow_fs().FileType.File else None

    def sizes(self) -> dict[str, int]:
        """``{name: size}`` of the files directly in the folder (one listing call)."""
        if self.fs is None:
            root = Path(self.root)
            return {p.name: p.stat().st_size for p in root.iterdir() if p.is_file()} \
                if root.is_dir() else {}
        pafs = _pyarrow_fs()
        infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        return {info.base_name: info.size for info in infos if info.type == pafs.FileType.File}

    def read(self, name: str) -> Optional[bytes]:
        """The bytes of file ``name``, None when there is none."""
        if self.size(name) is None:
            return None
        if self.fs is None:
            return Path(self.path(name)).read_bytes()
        with self.fs.open_input_stream(self.path(name)) as f:
            return f.read()

    def sha256(self, name: str) -> str:
        """sha256 of file ``name`` (read in 1 MiB pieces)."""
        h = hashlib.sha256()
        if self.fs is None:
            with open(self.path(name), "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            return h.hexdigest()
        with self.fs.open_input_stream(self.path(name)) as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    # ------------------------------------------------------------------------------- writing

    def makedirs(self, name: str = "") -> None:
        """Create folder ``name`` and its parents (nothing to do on an object store)."""
        if self.fs is None:
            Path(self.path(name)).mkdir(parents=True, exist_ok=True)
        elif not self.atomic_put:
            self.fs.create_dir(self.path(name), recursive=True)

    def write(self, name: str, data: bytes) -> None:
        """Write file ``name`` so that it appears whole or not at all: one PUT on an object store,
        else a temporary name in the same folder moved over it."""
        parent = name.rpartition("/")[0]
        self.makedirs(parent)
        final = self.path(name)
        if self.atomic_put:
            with self.fs.open_output_stream(final) as f:
                f.write(data)
            return
        base = name.rpartition("/")[2]
        tmp = self.path(f"{parent}/.{base}.{os.getpid()}.tmp" if parent
                        else f".{base}.{os.getpid()}.tmp")
        try:
            if self.fs is None:
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, final)
            else:
                with self.fs.open_output_stream(tmp) as f:
                    f.write(data)
                self.fs.move(tmp, final)
        finally:
            self._remove_quietly(tmp)

    def _remove_quietly(self, path: str) -> None:
        if self.fs is None:
            if os.path.lexists(path):
                os.unlink(path)
            return
        if self.fs.get_file_info(path).type == _pyarrow_fs().FileType.File:
            self.fs.delete_file(path)

    def append(self, name: str, text: str) -> bool:
        """Append ``text`` to file ``name`` (created when missing) and return True; False when the
        filesystem cannot append (object stores), and then nothing was written."""
        if not self._can_append:
            return False
        if self.fs is None:
            with open(self.path(name), "a", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            return True
        try:
            with self.fs.open_append_stream(self.path(name)) as f:
                f.write(text.encode("utf-8"))
        except NotImplementedError:  # pyarrow's ArrowNotImplementedError is one
            self._can_append = False
            return False
        return True
