"""Shared file helpers: strict JSON, JSON lines with torn-tail repair, atomic writes, fingerprints, the lock."""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os

import pytest
import torch

from learn2steer._io import (
    FolderLock,
    JsonlAppender,
    dumps,
    fingerprint,
    read_jsonl,
    repair_jsonl,
    write_json,
)
from learn2steer.errors import BusyError, InvalidInputError, MissingFileError


def test_json_is_strict() -> None:
    assert json.loads(dumps({"a": float("nan"), "b": [float("inf"), 1.5]})) == {"a": None, "b": [None, 1.5]}


def test_read_jsonl_strict_and_lenient(tmp_path) -> None:
    p = tmp_path / "x.jsonl"
    p.write_text('{"a": 1}\n\n[1, 2]\n{oops\n{"a": 2}\n')
    got = read_jsonl(p, strict=False)
    assert [r["a"] for r in got] == [1, 2] and got.bad_lines == [3, 4] and got.line_numbers == [1, 5]
    with pytest.raises(InvalidInputError, match=r"x.jsonl:3: not a JSON object"):
        read_jsonl(p)
    with pytest.raises(MissingFileError):
        read_jsonl(tmp_path / "none.jsonl")


@pytest.mark.parametrize("tail", [b'{"id": "c", "resp', b'{"id": "c"}', b"garbage\n"])
def test_torn_tail_is_cut_before_appending(tmp_path, tail: bytes) -> None:
    p = tmp_path / "g.jsonl"
    p.write_bytes(b'{"id": "a"}\n{"id": "b"}\n' + tail)
    with JsonlAppender(p) as out:
        out.write_many([{"id": "d"}])
    ids = [r["id"] for r in read_jsonl(p)]
    assert ids == (["a", "b", "d"] if tail != b'{"id": "c"}' else ["a", "b", "d"])
    assert repair_jsonl(p) == 0 and p.read_bytes().endswith(b"\n")


def test_write_json_is_atomic(tmp_path) -> None:
    p = write_json(tmp_path / "d" / "r.json", {"x": math.nan})
    assert json.loads(p.read_text()) == {"x": None}
    assert [q.name for q in p.parent.iterdir()] == ["r.json"], "no temporary left behind"


def test_fingerprint_sees_settings_and_tensor_contents() -> None:
    t = torch.ones(3)
    a = fingerprint("m", 1.0, tensors=[t])
    assert a == fingerprint("m", 1.0, tensors=[torch.ones(3)])
    assert a != fingerprint("m", 1.5, tensors=[t]) != fingerprint("m", 1.0, tensors=[t * 2])
    assert fingerprint(tensors=[torch.ones(2, 3)]) != fingerprint(tensors=[torch.ones(3, 2)])


def _hold(folder: str, q) -> None:  # child process: take the lock, report, wait to be killed
    with FolderLock(folder, "extraction"):
        q.put("locked")
        import time

        time.sleep(60)


def test_folder_lock_refuses_a_second_writer_and_dies_with_its_holder(tmp_path) -> None:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    child = ctx.Process(target=_hold, args=(str(tmp_path), q))
    child.start()
    try:
        assert q.get(timeout=30) == "locked"
        with pytest.raises(BusyError, match=f"pid {child.pid}"):
            with FolderLock(tmp_path, "extraction"):
                pass
    finally:
        child.kill()
        child.join()
    with FolderLock(tmp_path, "extraction"):  # the kernel released the dead holder's lock
        assert os.path.exists(tmp_path / ".lock")
