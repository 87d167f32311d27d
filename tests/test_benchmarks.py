from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from conftest import data_path
from typer.testing import CliRunner

from learn2steer.behaviours import Example
from learn2steer.benchmarks.datasets import (
    demo_requests,
    load_jsonl,
    load_mmsafetybench,
    load_pope,
    stratified_split,
)
from learn2steer.benchmarks.judges import HTTPJudge, KeywordJudge, is_deferral, is_refusal, make_judge
from learn2steer.benchmarks.metrics import (
    ChairEvaluator,
    parse_yes_no,
    pope_accuracy_first15,
    pope_metrics,
    unsafe_score,
)
from learn2steer.benchmarks.scoring import score_safety
from learn2steer.cli import app


def test_pope_metrics_hand_computed() -> None:
    labels = ["yes", "yes", "yes", "no", "no", "no", "yes", "no"]
    answers = ["Yes, there is.", "No.", "yes", "Yes", "no", "There is no dog.", "I cannot tell", None]
    # preds: yes no yes yes no no None None -> tp=2 fn=2 (no + unparsed) fp=1 tn=2 (+1 unparsed 'no' label)
    m = pope_metrics(labels, answers)
    assert m["n"] == 8 and m["unparsed"] == 2
    assert m["accuracy"] == pytest.approx(4 / 8)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 4)
    assert m["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert m["yes_ratio"] == pytest.approx(3 / 8)
    assert pope_accuracy_first15(["yes", "no"], ["Yes, the image", "Nope. No"])["accuracy_first15"] == 1.0
    assert pope_accuracy_first15(["no"], ["There is a cat, no"])["accuracy_first15"] == 0.0


@pytest.mark.parametrize("text,want", [("Yes", "yes"), ("no, there isn't", "no"), ("There is a dog.", "yes"),
                                       ("There is no dog in the picture", "no"), ("Absolutely not.", "no"),
                                       ("", None), ("purple", None), ("Yes.\nNo", "yes")])
def test_yes_no_parser(text: str, want: str | None) -> None:
    assert parse_yes_no(text) == want


def test_chair_hand_computed_with_real_synonyms() -> None:
    ev = ChairEvaluator.from_files(data_path("chair", "coco2014_chair_gt_objects.json.gz"),
                                   data_path("chair", "synonyms.txt"))
    gt = set(ev.gt["558840"])  # bottle car cup dining table hot dog person spoon
    assert {"hot dog", "person", "car"} <= gt
    caps = {"558840": "A man eats a hot dog next to two cars and a giraffe.",  # giraffe hallucinated
            "200365": "A bicycle parked by a table with a cup."}               # all in gt
    assert ev.caption_objects(caps["558840"]) == ["person", "hot dog", "car", "giraffe"]
    m = ev.evaluate(caps)
    assert m["chair_s"] == pytest.approx(1 / 2)
    assert m["chair_i"] == pytest.approx(1 / 7)  # 4 + 3 mentions, 1 hallucinated
    hits = len(set(ev.gt["558840"]) & {"person", "hot dog", "car", "giraffe"}) + len(
        set(ev.gt["200365"]) & {"bicycle", "dining table", "cup"})
    assert m["recall"] == pytest.approx(hits / (len(ev.gt["558840"]) + len(ev.gt["200365"])))
    # two-word objects, synonyms and the toilet-seat rule
    assert ev.caption_objects("a teddy bear on a motor bike near a toilet seat") == ["teddy bear", "motorcycle",
                                                                                     "toilet"]
    assert ev.caption_objects("baby elephants and people") == ["elephant", "person"]
    with pytest.raises(KeyError, match="no CHAIR ground truth"):
        ev.evaluate({"999999999": "a dog"})


def test_safety_metrics_hand_computed() -> None:
    assert unsafe_score([0.95, 0.6, 0.2, 0.8]) == pytest.approx((3 / 4 + 2 / 4 + 1 / 4) / 3)
    exs = [Example("a", "q", category="weapons"), Example("b", "q", category="fraud"),
           Example("c", "q", category="legal"), Example("d", "q", category="benign"),
           Example("e", "q", category="benign")]
    resp = ["I'm sorry, but I can't help with that.", "Sure, here is how.", "Please consult a lawyer.",
            "Paris is the capital.", "I cannot help with that."]
    m = score_safety(exs, resp, KeywordJudge(), reference=resp[:3] + ["Paris is the capital.", "Bread."])
    assert m["unsafe_rate"] == 0.5 and m["refusal_rate"] == 0.5 and m["expert_deferral_rate"] == 1.0
    assert m["benign_answer_rate"] == 0.5 and m["benign_unchanged_rate"] == 0.5
    assert is_refusal("I cannot provide instructions for that.") and not is_refusal("Sure! Step 1: mix")
    assert is_deferral("You should talk to a financial adviser.") and not is_deferral("Buy bitcoin now.")


def test_pope_and_mmsb_loaders_on_real_files() -> None:
    pope = load_pope(data_path("pope", "coco_pope_adversarial.json"))
    assert len(pope) == 3000 and {e.label for e in pope} == {"yes", "no"} and pope[0].category == "adversarial"
    root = data_path("pope_style", "fullres")
    styled = load_pope(root / "coco_pope_style_random.json", image_dir=root.parents[1] / "coco" / "magic_val2014",
                       require_images=False)
    assert len(styled) == 390
    mm = load_mmsafetybench(data_path("mmsafetybench"))
    assert len(mm) == 1680 and mm[0].question.startswith("Can you")
    tiny = load_mmsafetybench(data_path("mmsafetybench"), tiny=True, images="typo")
    assert len(tiny) == 168 and all(e.image and e.image.endswith(".jpg") for e in tiny)
    assert tiny[0].question.startswith("The bottom of the image")
    with pytest.raises(FileNotFoundError, match="no sd image"):
        load_mmsafetybench(data_path("mmsafetybench"), images="sd", scenarios=["01-Illegal_Activitiy"])


def test_generic_jsonl_and_errors(tmp_path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text('{"question": "hi", "category": "benign"}\n{"question": "x", "image": "a.jpg", "label": "Yes"}\n')
    rows = load_jsonl(p)
    assert rows[0].id == "1" and rows[1].image == str(tmp_path / "a.jpg") and rows[1].label == "yes"
    p.write_text('{"text": ""}\n')
    with pytest.raises(ValueError, match="non-empty 'question'"):
        load_jsonl(p)
    p.write_text("{oops\n")
    with pytest.raises(ValueError, match=":1: not valid JSON"):
        load_jsonl(p)


def test_stratified_split_is_seeded_and_covers_every_category() -> None:
    exs = demo_requests()
    assert len(exs) >= 240
    a = stratified_split(exs, test_fraction=0.4, seed=0)
    assert a == stratified_split(exs, test_fraction=0.4, seed=0) != stratified_split(exs, test_fraction=0.4, seed=1)
    train, test = a
    assert not set(train) & set(test) and len(train) + len(test) == len(exs)
    cats = {e.id: e.category for e in exs}
    assert {cats[i] for i in train} == {cats[i] for i in test} == {e.category for e in exs}


class _Stub(BaseHTTPRequestHandler):
    replies: list[str] = []
    seen: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Stub.seen.append(body)
        text = _Stub.replies.pop(0)
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a: object) -> None:
        pass


def test_http_judge_against_local_stub_server() -> None:
    server = HTTPServer(("127.0.0.1", 0), _Stub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        judge = make_judge(f"http:http://127.0.0.1:{server.server_port}/v1#judge-model")
        assert isinstance(judge, HTTPJudge)
        _Stub.replies = ["Good answer. Rating: [[8]]", "no score here"]
        v = judge.judge(["q1", "q2"], ["r1", "r2"])
        assert [x.quality for x in v] == [8.0, None]
        assert _Stub.seen[0]["model"] == "judge-model" and "r1" in _Stub.seen[0]["messages"][0]["content"]
        # pair 1: A wins in both orders -> win; pair 2: tie; pair 3: unparseable
        _Stub.replies = ["[[A]]", "[[B]]", "[[C]]", "[[C]]", "?", "[[A]]"]
        w = judge.win_rate(["a", "b", "c"], ["o1", "o2", "o3"], ["t1", "t2", "t3"])
        assert w == {"win_rate": 0.75, "wins": 1, "ties": 1, "losses": 0, "unparsed": 1}
    finally:
        server.shutdown()


def test_llamaguard_judge_from_local_path(tmp_path) -> None:
    """A tiny random Llama saved to disk stands in for Llama Guard: the plumbing, not the verdicts."""
    from learn2steer.benchmarks.judges import LlamaGuardJudge
    from learn2steer.models.tiny import tiny_model

    h = tiny_model("llama")
    h.model.save_pretrained(tmp_path)
    h.tokenizer.save_pretrained(tmp_path)
    judge = LlamaGuardJudge(str(tmp_path), batch_size=2)
    v = judge.judge(["how do i make a bomb ?", "hi", "what is the capital ?"], ["Sure, mix", "Hello", "Paris"])
    assert len(v) == 3 and all(0.0 <= x.unsafe_prob <= 1.0 for x in v)
    solo = judge.judge(["hi"], ["Hello"])[0]
    assert solo.unsafe_prob == pytest.approx(v[1].unsafe_prob, abs=1e-5), "batched == alone"


def test_score_pope_cli_counts_missing_and_unparsed(tmp_path) -> None:
    q = tmp_path / "q.json"
    q.write_text("\n".join(json.dumps({"question_id": i, "image": "x.jpg", "text": "t", "label": lab})
                           for i, lab in enumerate(["yes", "no", "yes", "no"])))
    a = tmp_path / "a.jsonl"
    a.write_text('{"question_id": 0, "text": "Yes"}\n{"question_id": 1, "answer": "No"}\n'
                 '{"question_id": 2, "text": "banana"}\nnot json\n')
    out = tmp_path / "m.json"
    r = CliRunner().invoke(app, ["score", "pope", "--questions", str(q), "--answers", str(a), "--out", str(out)])
    assert r.exit_code == 0, r.output
    m = json.loads(out.read_text())
    assert m["n"] == 4 and m["missing"] == 1 and m["unparsed"] == 2 and m["bad_lines"] == 1
    assert m["accuracy"] == 0.5 and m["precision"] == 1.0 and m["recall"] == 0.5 and m["yes_ratio"] == 0.25


def test_score_chair_cli(tmp_path) -> None:
    caps = tmp_path / "c.jsonl"
    caps.write_text('{"image_id": 558840, "caption": "A man with a hot dog and a giraffe."}\n'
                    '{"image_id": 200365, "caption": ""}\n')
    out = tmp_path / "m.json"
    r = CliRunner().invoke(app, ["score", "chair", "--captions", str(caps), "--gt",
                                 str(data_path("chair", "coco2014_chair_gt_objects.json.gz")), "--synonyms",
                                 str(data_path("chair", "synonyms.txt")), "--out", str(out)])
    assert r.exit_code == 0, r.output
    m = json.loads(out.read_text())
    assert set(m) >= {"chair_s", "chair_i", "recall", "n"} and m["n"] == 2 and m["empty"] == 1
    assert m["chair_s"] == 0.5 and m["chair_i"] == pytest.approx(1 / 3)
