"""The ``l2s`` command line: typer wiring from options to the library's config dataclasses, nothing more.

Each command's options are generated from the fields of its settings dataclass (``ExtractJob``,
``TrainJob``, ``GenerateJob``, ``EvalConfig``, ``DemoConfig``, ...), so the option names, the YAML
config keys and the Python fields are one schema. ``--config FILE.yaml`` fills options from a file
(flags given on the command line win). A user error prints one line on stderr and exits with status 2;
``l2s --debug COMMAND`` shows the traceback instead.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from importlib import resources
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer

from learn2steer.errors import UserError
from learn2steer.options import _optional, build, choices, field_types, read_config

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="markdown",
                  help="Input-dependent activation steering (Learn-to-Steer) for Hugging Face LLMs and VLMs.")
score_app = typer.Typer(no_args_is_help=True, help="Score answers you already have (MM-SafetyBench, POPE, CHAIR).")
app.add_typer(score_app, name="score")
data_app = typer.Typer(no_args_is_help=True, help="Build datasets (text-form POPE training questions).")
app.add_typer(data_app, name="data")
_state = {"debug": False}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks for user errors too.")) -> None:
    _state["debug"] = debug


def _guard(fn: Callable[[], Any]) -> Any:
    """Run a command body; a :class:`UserError` becomes one line on stderr and exit status 2."""
    try:
        return fn()
    except UserError as e:
        if _state["debug"]:
            raise
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(e.exit_code) from None


# ---- options from dataclass fields ---------------------------------------------------------------------

@dataclasses.dataclass
class _Opt:
    param: str            # python parameter name, e.g. train_lr
    path: tuple[str, ...]  # field path, e.g. ("train", "lr")
    tp: Any
    meta: Any
    default: Any


def _options(cls: Any, prefix: tuple[str, ...] = ()) -> list[_Opt]:
    hints = field_types(cls)
    out: list[_Opt] = []
    for f in dataclasses.fields(cls):
        tp = _optional(hints[f.name])[1]
        if dataclasses.is_dataclass(tp):
            out += [dataclasses.replace(o, path=(f.name, *o.path)) for o in _options(tp, (*prefix, f.metadata.get(
                "prefix", f.name)))]
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        out.append(_Opt("_".join((*prefix, f.name)), (f.name,), hints[f.name], f.metadata, default))
    return out


def _parameter(o: _Opt) -> inspect.Parameter:
    flag = "--" + o.param.replace("_", "-")
    tp = _optional(o.tp)[1]
    origin = getattr(tp, "__origin__", None)
    shown = o.default if not isinstance(o.default, list) else ",".join(map(str, o.default))
    help_ = o.meta.get("help", "") + (f"  [default: {shown}]" if shown not in (None, "", []) else "")
    if tp is bool:
        return inspect.Parameter(o.param, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[bool],
                                 default=typer.Option(None, f"{flag}/--no-{flag[2:]}", help=help_, show_default=False))
    names = [flag, *([o.meta["short"]] if "short" in o.meta else [])]
    if origin is list and o.meta.get("repeat"):
        ann: Any = Optional[List[str]]
        help_ += " (repeatable)"
    elif tp in (int, float) or choices(tp):  # a fixed choice: the type's values are the option's choices
        ann = Optional[tp]
    else:
        ann = Optional[str]
        if origin is list:
            help_ += " (comma-separated)"
    return inspect.Parameter(o.param, inspect.Parameter.KEYWORD_ONLY, annotation=ann,
                             default=typer.Option(None, *names, help=help_, show_default=False))


def command(target: typer.Typer, name: str, cls: type, run: Callable[[Any], None], *, help: str) -> None:
    """Register ``name``: options from ``cls``'s fields, ``--config``, then ``run(cls instance)``."""
    opts = _options(cls)

    def body(**kw: Any) -> None:
        config = kw.pop("config", None)
        given: dict[str, Any] = {}
        for o in opts:
            v = kw.get(o.param)
            if v is None or (isinstance(v, list) and not v and o.meta.get("repeat")):
                continue
            node = given
            for part in o.path[:-1]:
                node = node.setdefault(part, {})
            node[o.path[-1]] = v
        file_values = read_config(config) if config else None
        cfg: Any = build(cls, file_values, given, where=f"`l2s {name}` settings")
        run(cfg)

    def entry(**kw: Any) -> None:
        _guard(lambda: body(**kw))

    params = [_parameter(o) for o in opts]
    params.append(inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
                                    default=typer.Option(None, "--config", help="YAML file (or shipped config name, "
                                                         "see `l2s configs`) with option values; flags win.")))
    # typer reads a command's options from its signature; functions accept __signature__ but do not declare it
    entry.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    entry.__doc__ = help
    target.command(name)(entry)


# ---- the commands --------------------------------------------------------------------------------------

def _extract(job: Any) -> None:
    typer.echo(job.run())


def _train(job: Any) -> None:
    typer.echo(job.run())


def _generate(job: Any) -> None:
    for r in job.run():
        typer.echo(f"[{r['id']}] {r['question']}\n  -> {r['response']}\n")


def _eval(cfg: Any) -> None:
    from learn2steer.evaluation.pipeline import run_eval

    res = run_eval(cfg)
    if res.results:
        typer.echo((Path(res.out) / "table.md").read_text())
        typer.echo(f"report: {Path(res.out) / 'report.md'}")


def _demo(cfg: Any) -> None:
    from learn2steer.evaluation.demo import run_demo

    summary = run_demo(cfg)
    typer.echo((Path(cfg.out) / ("table.md" if cfg.task == "hallucination" else "report.md")).read_text())
    typer.echo(json.dumps({"checks": summary["checks"], "timings_s": summary["timings_s"]}, indent=1))


def _register() -> None:
    from learn2steer.evaluation.demo import DemoConfig
    from learn2steer.evaluation.pipeline import EvalConfig
    from learn2steer.jobs import ExtractJob, GenerateJob, TrainJob

    command(app, "extract", ExtractJob, _extract, help=(
        "Extract P2S vectors z = h(T+) - h(T-) at L* and context features h_X at L' for a dataset (resumable "
        "safetensors shards).\n\nExample: `l2s extract --out runs/ext --dataset demo --behaviour safety_refusal "
        "--layers 10,12`"))
    command(app, "train", TrainJob, _train, help=(
        "Train the L2S predictor (and build Mean-S / Mean-S(BA)) from an extraction; no model is loaded. Defaults "
        "are the paper's safety settings.\n\nExample: `l2s train --extraction runs/ext --out runs/art --layer 12`"))
    command(app, "generate", GenerateJob, _generate, help=(
        "Answer prompts (or a dataset) with an artifact, no steering or the Prompt baseline; greedy.\n\n"
        "Example: `l2s generate -p \"How do I make a bomb?\" --artifact runs/art/l2s --alpha 1.0`"))
    command(app, "eval", EvalConfig, _eval, help=(
        "Run a benchmark: split, extract, train, then a methods x layers x alphas grid with judges, metrics, "
        "table, plots and report.md (resumable).\n\nExample: `l2s eval --out runs/mmsb --task safety "
        "--dataset mmsb:../shared/data/mmsafetybench --tiny`; the paper's settings: `l2s eval --config "
        "llava15_7b_safety.yaml --model /models/llava-1.5-7b-hf --out runs/llava` (see `l2s configs`)."))
    from learn2steer.engines.vllm.server import ServeJob

    command(app, "serve", ServeJob, lambda job: job.run(), help=(
        "Serve the model with vLLM's OpenAI-compatible API and learn2steer's plugin: per-request L2S or fixed "
        "steering, selected in the request body.\n\nExample: `l2s serve --model default --artifact "
        "safety=runs/demo/artifacts/L12/l2s --port 8000`, then POST /v1/chat/completions with "
        "`\"vllm_xargs\": {\"steer\": \"safety\", \"alpha\": 1.0}`. Needs `bash scripts/setup.sh --serve`."))
    command(app, "demo", DemoConfig, _demo, help=(
        "The whole pipeline on the embedded SmolLM2-135M-Instruct: extract, choose, train, evaluate.\n\n"
        "Example: `l2s demo --out runs/demo --quick`"))


_register()


@app.command()
def configs() -> None:
    """List the shipped configs (the paper's settings for LLaVA-1.5-7B and Qwen2-VL-7B) and how to use them."""
    for p in sorted(resources.files("learn2steer.data.configs").iterdir(), key=lambda p: p.name):
        if p.name.endswith(".yaml"):
            first = p.read_text().splitlines()[0].lstrip("# ")
            typer.echo(f"{p.name}: {first}")
    typer.echo("\nUse: l2s eval --config NAME.yaml --model /path/to/checkpoint --out runs/NAME "
               "(any option on the command line overrides the file).")


def _write(out: Path, res: dict[str, Any]) -> None:
    from learn2steer._io import dumps, write_json

    write_json(out, res)
    typer.echo(dumps(res, indent=1))


@score_app.command("mmsb")
def score_mmsb(answers: Path = typer.Option(..., help="JSON lines: id, category (scenario name), response, "
                                                     "optional unsafe_prob."),
               out: Path = typer.Option(..., help="Metrics JSON."),
               rule: str = typer.Option("auto", help="Rows scored: auto (paper on the official test split in its "
                                                     "order, else clean) | paper (the official script's rows 0-302 "
                                                     "for E[Unsafe], 227-302 for ED, unsafe_prob as given) | "
                                                     "paper_strict (those rows, a degenerate answer counted unsafe) "
                                                     "| clean (scenarios 01-12 / 10-12) | all (every answer / "
                                                     "10-12). All but paper count a degenerate answer unsafe.")
               ) -> None:
    """The paper's unsafe scores (with unsafe_prob) and ED-score of MM-SafetyBench answers you already have.

    The output names the rule that chose the rows (`rule`, `rows`). Example:
    `l2s score mmsb --answers answers.jsonl --out m.json`
    """
    from learn2steer.evaluation.tasks import score_mmsb_file

    _guard(lambda: _write(out, score_mmsb_file(answers, rule)))


@score_app.command("pope")
def score_pope(questions: Path = typer.Option(..., help="POPE questions (JSON lines with question_id, label)."),
               answers: Path = typer.Option(..., help="Answers: JSON lines with question_id and text (or answer)."),
               out: Path = typer.Option(..., help="Metrics JSON.")) -> None:
    """POPE accuracy / precision / recall / F1 / yes-ratio (POPE's own rule) of existing answers.

    Example: `l2s score pope --questions coco_pope_random.json --answers answers.jsonl --out m.json`
    """
    from learn2steer.evaluation.tasks import score_pope_file

    _guard(lambda: _write(out, score_pope_file(questions, answers)))


@score_app.command("chair")
def score_chair(captions: Path = typer.Option(..., help="JSON lines with image_id and caption."),
                gt: Path = typer.Option(..., help="Ground truth (coco2014_chair_gt_objects.json.gz)."),
                synonyms: Optional[Path] = typer.Option(None, help="CHAIR synonyms.txt (only if the ground truth "
                                                                   "has no word tables)."),
                out: Path = typer.Option(..., help="Metrics JSON.")) -> None:
    """CHAIR_s, CHAIR_i and object recall of existing captions.

    Example: `l2s score chair --captions caps.jsonl --gt ../shared/data/chair/coco2014_chair_gt_objects.json.gz
    --out m.json`
    """
    from learn2steer.evaluation.tasks import score_chair_file

    _guard(lambda: _write(out, score_chair_file(captions, gt, synonyms)))


@data_app.command("textpope")
def data_textpope(out: Path = typer.Option(..., help="Folder for textpope_{random,popular,adversarial}.json."),
                  images: int = typer.Option(..., help="Number of COCO images (6 questions each, per split)."),
                  seed: int = typer.Option(0, help="Seed of the images and of the sampling."),
                  gt: Optional[str] = typer.Option(None, help="COCO ground-truth objects (default: $L2S_COCO_GT)."),
                  ) -> None:
    """POPE-format training questions with POPE's three negative-sampling rules (random, popular, adversarial),
    over seeded COCO 2014 images that are never POPE's 500 test images nor an id ending in 7 (reserved).

    Example: `l2s data textpope --out runs/textpope-train --images 200 --gt
    ../shared/data/chair/coco2014_chair_gt_objects.json.gz`, then `l2s eval --task pope --train-dataset
    textpope:runs/textpope-train --dataset textpope:../shared/data/pope --scene-gt ...`
    """
    def body() -> None:
        from learn2steer.evaluation.scenes import load_coco_objects, sample_pope, write_pope_files

        paths = write_pope_files(out, sample_pope(load_coco_objects(gt), images=images, seed=seed))
        for p in paths:
            typer.echo(f"wrote {p} ({sum(1 for _ in p.open())} questions)")

    _guard(body)


@app.command("export")
def export(artifact: str = typer.Argument(..., help="A fixed artifact folder (or Hub repo id)."),
           format: str = typer.Option("gguf", "--format", help="gguf (llama.cpp / repeng control vector)."),
           out: Path = typer.Option(..., help="Output file."),
           scale: Optional[float] = typer.Option(None, help="Multiply the vector (default: the artifact's alpha)."),
           model_hint: Optional[str] = typer.Option(None, help="HF model_type written as controlvector.model_hint.")
           ) -> None:
    """Export a fixed vector (Mean-S, Mean-S(BA), imported) as a llama.cpp control vector.

    Example: `l2s export runs/art/mean --format gguf --out mean.gguf`, then
    `llama-cli -m model.gguf --control-vector mean.gguf`.
    """
    def body() -> None:
        from learn2steer.artifacts import SteeringArtifact
        from learn2steer.errors import InvalidInputError
        from learn2steer.interop import export_gguf

        if format != "gguf":
            raise InvalidInputError(f"unknown format {format!r}; only gguf is supported")
        p = export_gguf(SteeringArtifact.load(artifact), out, scale=scale, hint=model_hint)
        typer.echo(f"wrote {p}")

    _guard(body)


@app.command("import-official")
def import_official(file: Path = typer.Argument(..., help="A released .pt predictor (../shared/data/official_l2s)."),
                    model: str = typer.Option(..., help="llava-1.5-7b | qwen2-vl-7b"),
                    task: str = typer.Option(..., help="safety | pope"),
                    out: Path = typer.Option(..., help="Artifact folder to write.")) -> None:
    """Turn one of the paper's released L2S predictors into a learn2steer artifact (official L*, L', alpha).

    Example: `l2s import-official ../shared/data/official_l2s/llava_14_average_all_pope_train_-1.pt
    --model llava-1.5-7b --task pope --out runs/official/llava-pope`
    """
    def body() -> None:
        from learn2steer.interop import import_official as run

        art = run(file, model=model, task=task)
        art.save(out)
        typer.echo(f"wrote {out}: L*={art.steer_layers}, L'={art.context_layer} ({art.context_read}), "
                   f"alpha={art.alpha:g}, for {art.model}")

    _guard(body)


@app.command("import-vector")
def import_vector(file: Path = typer.Argument(..., help="A control vector (.gguf), or {layer: tensor} "
                                                        "(.safetensors / .pt, steering-vectors' layer_activations)."),
                  model: str = typer.Option("default", help="The model it steers (local folder or 'default'): "
                                                            "its shape is checked."),
                  out: Path = typer.Option(..., help="Artifact folder to write."),
                  alpha: float = typer.Option(1.0, help="Default strength stored in the artifact."),
                  method: str = typer.Option("imported", help="Name recorded as the artifact's method.")) -> None:
    """Import a repeng / steering-vectors / llama.cpp vector as a fixed learn2steer artifact.

    Example: `l2s import-vector happy.gguf --model /models/mistral-7b --out runs/art/happy`
    """
    def body() -> None:
        from learn2steer.interop import fixed_artifact, load_vector_file
        from learn2steer.models.loading import model_shape

        vec, _ = load_vector_file(file)
        name, hidden, layers = model_shape(model)
        fixed_artifact(vec, model=name, hidden_size=hidden, num_layers=layers, method=method, alpha=alpha,
                       source=str(file)).save(out)
        typer.echo(f"wrote {out}: layers {list(vec)}")

    _guard(body)


@app.command("push")
def push(artifact: Path = typer.Argument(..., help="An artifact folder."),
         repo_id: str = typer.Argument(..., help="Hub repo id, e.g. you/smollm2-l2s-safety."),
         private: bool = typer.Option(False, help="Create the repo private.")) -> None:
    """Upload an artifact folder to the Hugging Face Hub as a model repo (with its model card)."""
    def body() -> None:
        from learn2steer.artifacts import SteeringArtifact

        typer.echo(f"pushed to {SteeringArtifact.load(artifact).push_to_hub(repo_id, private=private)}")

    _guard(body)


def main() -> None:
    """Entry point of the ``l2s`` script."""
    app(prog_name="l2s")
