"""Small file helpers every stage shares: JSON-lines, atomic writes, fingerprints, a writer lock.

Why one module: resumable runs depend on these details being right everywhere at once. A JSON-lines file
written by appending whole lines and fsyncing can only ever be damaged at its last line (a SIGKILL during
a write); :func:`repair_jsonl` cuts that torn tail before anything is appended again, so a resumed run
never glues a new record onto half an old one and never counts a record twice.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

import torch

from learn2steer.errors import BusyError, InvalidInputError, MissingFileError

# ---- JSON --------------------------------------------------------------------------------------------------

def jsonable(obj: Any) -> Any:
    """``obj`` with NaN / inf floats replaced by None, so the JSON written is standard (no bare NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def dumps(obj: Any, *, indent: int | None = None) -> str:
    """Strict JSON text (NaN -> null) for anything learn2steer writes."""
    return json.dumps(jsonable(obj), indent=indent, allow_nan=False)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary sibling and a rename: readers never see half a file."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary sibling and a rename: readers never see half a file.

    The temporary name is unique per writer, so two processes writing the same file cannot clobber each
    other's temporary (the last rename wins, and each rename is whole).
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def write_json(path: str | Path, obj: Any, *, indent: int = 1) -> Path:
    """Atomically write strict JSON."""
    return write_text_atomic(path, dumps(obj, indent=indent) + "\n")


def read_json(path: str | Path, *, what: str = "JSON file") -> Any:
    """Read a JSON file; a missing or malformed file is a :class:`UserError` naming the file."""
    p = Path(path)
    if not p.exists():
        raise MissingFileError(f"{what} {str(p)!r} does not exist")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise InvalidInputError(f"{what} {str(p)!r} is not valid JSON ({e}); restore or delete it") from None


# ---- JSON lines ---------------------------------------------------------------------------------------------

@dataclass
class JsonLines:
    """What :func:`read_jsonl` found: the records, and the line numbers that were not JSON objects."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    line_numbers: list[int] = field(default_factory=list)
    bad_lines: list[int] = field(default_factory=list)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)


def read_jsonl(source: str | Path | Iterable[str], *, strict: bool = True, what: str = "JSON-lines file"
               ) -> JsonLines:
    """Parse JSON lines (blank lines skipped). Each record must be a JSON object.

    ``strict=True`` raises :class:`InvalidInputError` at the first bad line, naming file and line;
    ``strict=False`` collects the bad line numbers instead (for scoring user files, where the report
    says how many lines were unreadable).
    """
    name = "<text>"
    if isinstance(source, (str, Path)):
        p = Path(source)
        if not p.exists():
            raise MissingFileError(f"{what} {str(p)!r} does not exist")
        name, lines = str(p), p.read_text().splitlines()
    else:
        lines = list(source)
    out = JsonLines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if strict:
                raise InvalidInputError(f"{name}:{n}: not a JSON object ({e}); fix or remove that line") from None
            out.bad_lines.append(n)
            continue
        out.rows.append(rec)
        out.line_numbers.append(n)
    return out


def repair_jsonl(path: str | Path) -> int:
    """Cut a torn last line (no newline, or not valid JSON) left by an interrupted append.

    Returns the number of bytes removed (0 when the file is whole or absent). Only the tail can be torn:
    every append writes whole lines and fsyncs before the next, so earlier lines are never touched.
    """
    p = Path(path)
    if not p.exists():
        return 0
    data = p.read_bytes()
    keep = len(data)
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
    else:
        # the last complete line may still be garbage if the writer was killed mid-flush on some filesystems
        start = data.rfind(b"\n", 0, max(0, len(data) - 1)) + 1
        tail = data[start:keep].strip()
        if tail:
            try:
                json.loads(tail)
            except ValueError:
                keep = start
    if keep == len(data):
        return 0
    with p.open("r+b") as f:
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    return len(data) - keep


class JsonlAppender:
    """Append records as whole lines, fsynced per batch; repairs a torn tail on open.

    Use as a context manager: ``with JsonlAppender(path) as out: out.write_many(records)``.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.repaired = repair_jsonl(self.path)
        self._f: IO[str] | None = None

    def __enter__(self) -> "JsonlAppender":
        self._f = self.path.open("a")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def write_many(self, records: Iterable[dict[str, Any]]) -> None:
        """Write records in one write call and fsync: the batch is on disk when this returns."""
        assert self._f is not None, "use JsonlAppender as a context manager"
        text = "".join(dumps(r) + "\n" for r in records)
        if text:
            self._f.write(text)
            self._f.flush()
            os.fsync(self._f.fileno())


# ---- fingerprints -------------------------------------------------------------------------------------------

def fingerprint(*parts: Any, tensors: Iterable[torch.Tensor] = (), length: int = 16) -> str:
    """A short sha256 of JSON-able ``parts`` and the exact contents of ``tensors``.

    Used wherever a result must be tied to what produced it (settings + vectors), so that a resumed run
    never mixes answers computed under other settings.
    """
    h = hashlib.sha256(json.dumps(jsonable(list(parts)), sort_keys=True, default=str).encode())
    for t in tensors:
        t = t.detach().to("cpu", torch.float32).contiguous()
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:length]


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (artifact checksums)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---- a lock for one writer per folder ---------------------------------------------------------------------

class FolderLock:
    """An exclusive, non-blocking lock on ``folder/.lock`` (``fcntl.flock``), released on exit or death.

    A second writer gets :class:`BusyError` at once instead of racing; the kernel drops the lock when the
    holder dies, so a killed run never leaves a stale lock behind.
    """

    def __init__(self, folder: str | Path, what: str = "run", name: str = ".lock") -> None:
        self.folder = Path(folder)
        self.what = what
        self.name = name
        self._fd: int | None = None

    def __enter__(self) -> "FolderLock":
        import fcntl

        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / self.name
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise BusyError(f"{self.folder} is in use by another {self.what} (pid {holder}); wait for it "
                                "to finish or use another output folder") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        import fcntl

        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
