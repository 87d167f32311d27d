"""Shared fixtures: tiny random models of each architecture, real COCO images when available."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from learn2steer.models.loading import ModelHandle
from learn2steer.models.tiny import tiny_model

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("L2S_DATA", REPO.parent / "shared" / "data"))


def data_path(*parts: str) -> Path:
    """A path under the shared benchmark data; the test skips cleanly when it is absent."""
    p = DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared benchmark data not found at {p} (set L2S_DATA)")
    return p


@pytest.fixture(scope="session")
def tiny_llama() -> ModelHandle:
    return tiny_model("llama")


@pytest.fixture(scope="session")
def tiny_llava() -> ModelHandle:
    return tiny_model("llava")


@pytest.fixture(scope="session")
def tiny_qwen2_vl() -> ModelHandle:
    return tiny_model("qwen2_vl")


@pytest.fixture(scope="session", params=["llama", "llava", "qwen2_vl"])
def any_tiny(request: pytest.FixtureRequest) -> ModelHandle:
    return request.getfixturevalue(f"tiny_{request.param}")


@pytest.fixture(scope="session")
def coco_images() -> list[Path]:
    """Real COCO images of two sizes (256x256 resized and full resolution)."""
    resized = sorted(data_path("coco", "codewithminer_resized").glob("*.jpg"))[:2]
    full = sorted(data_path("coco", "tsbir_val2014").glob("*.jpg"))[:1]
    return resized + full


@pytest.fixture(scope="session")
def synthetic_images() -> list[Image.Image]:
    g = torch.Generator().manual_seed(0)
    sizes = [(64, 48), (90, 120)]
    return [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()) for w, h in sizes]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    from learn2steer.models.tiny import tiny_model

    h = tiny_model("llama")
    d = tmp_path_factory.mktemp("tiny-llama")
    h.model.save_pretrained(d)
    h.tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """120 safety-style requests over decline / defer / benign categories."""
    from learn2steer.evaluation.datasets import demo_requests

    d = tmp_path_factory.mktemp("data") / "requests.jsonl"
    rows = [{"id": e.id, "question": e.question, "category": e.category} for e in demo_requests()[::2][:120]]
    d.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d
