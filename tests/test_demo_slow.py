"""The README's main job end to end on the embedded model (slow: minutes)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from learn2steer.cli import app
from learn2steer.methods import METHODS


@pytest.mark.slow
def test_quick_demo_writes_results_report_and_plot(tmp_path) -> None:
    pytest.importorskip("gguf")
    r = CliRunner().invoke(app, ["demo", "--quick", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "results.json").read_text())
    assert set(METHODS) <= set(res["methods"])
    for m in METHODS:
        v = res["methods"][m]
        assert v["n"] > 0
        for k in ("unsafe_rate", "expert_deferral_rate", "benign_answer_rate", "benign_unchanged_rate"):
            assert 0.0 <= v[k] <= 1.0
    assert res["methods"]["no_steering"]["benign_unchanged_rate"] == 1.0
    assert res["layers"]["l2s"] is not None and res["alpha"]["l2s"] is not None
    assert {"load_model", "extract", "select", "train", "test", "total"} <= set(res["timings_s"])
    assert (tmp_path / "report.md").read_text().startswith("# learn2steer demo")
    assert (tmp_path / "rates.png").stat().st_size > 0
    split = json.loads((tmp_path / "split.json").read_text())
    assert not set(split["train"]) & set(split["test"]), "nothing is tuned on the test split"
