"""The folder behind ``l2s serve --registry DIR``: artifacts registered at runtime, one immutable folder per version.

::

    DIR/<name>/<version>/      config.json + vectors.safetensors | model.safetensors (never pickle)
    DIR/<name>/CURRENT         the version requests naming <name> get now (absent: not registered)

Why versions: a request is pinned to the version that was current when the server accepted it (the front end
writes it into the request), and every process (engine core, each tensor-parallel worker) loads exactly that
folder, the way start-up artifacts reach them (a folder on the machine's disk, read on first use). Replacing an
artifact writes a new version folder and moves ``CURRENT``; requests already running keep theirs. A version
folder is complete before its name points at it (written under ``DIR/.incoming-*``, checked, renamed), and
``CURRENT`` is replaced atomically, so a crash mid-upload leaves the previous version in use. Versions no longer
current are deleted only after :data:`GRACE_S` (a running request may still load them).

Pure Python (no vLLM, no torch): the API process writes it, every process reads it.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Mapping

from learn2steer._io import write_bytes_atomic
from learn2steer.errors import InvalidInputError

#: an artifact name: a letter or digit first, then letters, digits, '.', '_', '-' (no path, no '..' start)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: the only files an upload may hold (safetensors and JSON: nothing that unpickles)
FILES = ("config.json", "vectors.safetensors", "model.safetensors")
CURRENT = "CURRENT"
GRACE_S = 3600.0  # a replaced or removed version stays on disk this long (requests pinned to it may still load it)


def check_name(name: str) -> str:
    """``name`` if it is a valid artifact name; else one sentence."""
    if not isinstance(name, str) or not NAME.match(name) or ".." in name:
        raise InvalidInputError(f"artifact name {name!r} is not allowed; use 1-64 letters, digits, '.', '_' or '-', "
                                "starting with a letter or digit (no path)")
    return name


def version_of(files: Mapping[str, bytes]) -> str:
    """The content hash of an upload (the same files give the same version)."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return h.hexdigest()[:16]


class ArtifactStore:
    """Registered artifacts under one folder (see the module doc for the layout)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._lock = threading.Lock()  # one writer at a time in this process (the API server)

    def current(self, name: str) -> str | None:
        """The version requests naming ``name`` get now, or None when it is not registered."""
        if not NAME.match(name):
            return None
        try:
            version = (self.root / name / CURRENT).read_text().strip()
        except OSError:
            return None
        return version if (self.root / name / version).is_dir() else None

    def folder(self, name: str, version: str) -> Path:
        """The folder of one version (it may have been removed after :data:`GRACE_S`)."""
        check_name(name)
        if not re.fullmatch(r"[0-9a-f]{16}", version):
            raise InvalidInputError(f"artifact version {version!r} is not a version of this server")
        return self.root / name / version

    def names(self) -> dict[str, str]:
        """{name: current version} of every registered artifact."""
        if not self.root.is_dir():
            return {}
        out = {}
        for d in sorted(self.root.iterdir()):
            if d.is_dir() and NAME.match(d.name):
                v = self.current(d.name)
                if v is not None:
                    out[d.name] = v
        return out

    def put(self, name: str, files: Mapping[str, bytes], check: Callable[[Path], None]) -> tuple[str, str | None]:
        """Register (or replace) ``name`` with ``files``; ``check(folder)`` raises on an artifact that must not
        be served, and then nothing changes. Returns (new version, previous version or None)."""
        check_name(name)
        bad = sorted(set(files) - set(FILES))
        if bad:
            raise InvalidInputError(f"an artifact upload holds only {', '.join(FILES)}; got {', '.join(bad)}")
        version = version_of(files)
        self.root.mkdir(parents=True, exist_ok=True)
        with self._lock:
            incoming = Path(tempfile.mkdtemp(prefix=".incoming-", dir=self.root))
            try:
                for fname, data in files.items():
                    write_bytes_atomic(incoming / fname, data)
                check(incoming)
                (self.root / name).mkdir(exist_ok=True)
                target = self.root / name / version
                if target.exists():  # the same content again: keep the folder running requests may read
                    shutil.rmtree(incoming)
                else:
                    os.replace(incoming, target)
            finally:
                if incoming.exists():
                    shutil.rmtree(incoming, ignore_errors=True)
            previous = self.current(name)
            write_bytes_atomic(self.root / name / CURRENT, version.encode())
            self._retire(name, previous, version)
        return version, previous

    def remove(self, name: str) -> str | None:
        """Unregister ``name`` (new requests get a 400; running ones keep their version); the removed version."""
        check_name(name)
        with self._lock:
            previous = self.current(name)
            if previous is None:
                return None
            (self.root / name / CURRENT).unlink()
            self._retire(name, previous, None)
        return previous

    def _retire(self, name: str, previous: str | None, now_current: str | None) -> None:
        """``previous`` stopped being current: its grace period starts now; older retired versions may go."""
        if previous is not None and previous != now_current:
            os.utime(self.root / name / previous)
        self._collect(name)

    def _collect(self, name: str) -> None:
        """Delete versions of ``name`` that are not current and older than :data:`GRACE_S`."""
        keep = self.current(name)
        now = time.time()
        for d in (self.root / name).iterdir():
            if d.is_dir() and d.name != keep and now - d.stat().st_mtime > GRACE_S:
                shutil.rmtree(d, ignore_errors=True)
        for d in self.root.glob(".incoming-*"):  # left by a crash mid-upload
            if now - d.stat().st_mtime > GRACE_S:
                shutil.rmtree(d, ignore_errors=True)
