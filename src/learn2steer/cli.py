"""The ``l2s`` command line: extract, train, generate, eval, demo, score.

Every command writes its resolved settings (``settings.json``) next to its outputs. Any option can also
come from ``--config FILE.yaml`` (keys are option names with underscores); flags given on the command
line win over the file. The paper's settings ship as configs: ``l2s configs`` lists them.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Optional

import typer
import yaml

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="markdown",
                  help="Input-dependent activation steering (Learn-to-Steer) for Hugging Face LLMs and VLMs.")
score_app = typer.Typer(no_args_is_help=True, help="Score answers you already have (POPE, CHAIR).")
app.add_typer(score_app, name="score")


def _ints(s: str) -> list[int]:
    try:
        return [int(x) for x in str(s).split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {s!r}") from None


def _floats(s: str) -> list[float]:
    try:
        return [float(x) for x in str(s).split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated numbers, got {s!r}") from None


def _apply_config(ctx: typer.Context, config: Optional[Path], values: dict[str, Any]) -> dict[str, Any]:
    """Fill options left at their defaults from a YAML config; command-line flags win."""
    if config is None:
        return values
    path = Path(config)
    if not path.exists():
        res = resources.files("learn2steer.data.configs") / f"{config}"
        if not res.is_file():
            raise typer.BadParameter(f"config {str(config)!r} not found (a path, or a shipped name from `l2s configs`)")
        text = res.read_text()
    else:
        text = path.read_text()
    cfg = yaml.safe_load(text) or {}
    unknown = set(cfg) - set(values)
    if unknown:
        raise typer.BadParameter(f"config has unknown keys {sorted(unknown)}; valid: {sorted(values)}")
    for k, v in cfg.items():
        source = ctx.get_parameter_source(k)
        if source is None or source.name in ("DEFAULT", "DEFAULT_MAP"):
            values[k] = ",".join(map(str, v)) if isinstance(v, list) else v
    return values


def _write_settings(out: Path, command: str, values: dict[str, Any]) -> None:
    from learn2steer import __version__

    out.mkdir(parents=True, exist_ok=True)
    clean = {k: (str(v) if isinstance(v, Path) else v) for k, v in values.items() if k != "ctx"}
    (out / "settings.json").write_text(json.dumps({"command": command, "version": __version__, **clean}, indent=1))


def _load(model: str, layers_path: Optional[str], dtype: str = "auto"):  # noqa: ANN202
    from learn2steer.models.loading import load_model

    return load_model(model, layers_path=layers_path, dtype=dtype)


CONFIG_OPT = typer.Option(None, "--config", help="YAML file (or shipped config name) with option values.")
MODEL_OPT = typer.Option("default", help="Local model folder, or 'default' for the embedded SmolLM2-135M-Instruct.")
DATASET_OPT = typer.Option("demo", help="demo | jsonl:FILE | mmsb:ROOT | pope:FILE | chair:IMAGE_DIR")
LAYERS_PATH_OPT = typer.Option(None, help="Dotted path of the decoder layers for architectures not in the registry.")


@app.command()
def extract(
    ctx: typer.Context,
    out: Path = typer.Option(..., help="Output folder (safetensors shards + index.json; re-run to resume)."),
    model: str = MODEL_OPT,
    dataset: str = DATASET_OPT,
    behaviour: str = typer.Option(
        "safety", help="Shipped behaviour (safety, safety_refusal, hallucination) or a YAML/JSON spec."),
    layers: str = typer.Option("10", help="Steering layers L* (comma-separated) where z = h(T+) - h(T-) is read."),
    context_layers: str = typer.Option("", help="Context layers L' for h_X (default: the steering layers)."),
    image_dir: Optional[str] = typer.Option(None, help="Image folder for POPE / JSONL / MM-SafetyBench images."),
    mmsb_images: str = typer.Option("none", help="MM-SafetyBench images: none, typo, sd, sd_typo."),
    question_field: Optional[str] = typer.Option(None, help="MM-SafetyBench question field."),
    tiny: bool = typer.Option(False, help="MM-SafetyBench: only the official tiny subset."),
    limit: Optional[int] = typer.Option(None, help="Use only the first N examples."),
    batch_size: int = typer.Option(8),
    shard_size: int = typer.Option(256, help="Examples per shard (the unit of resumption)."),
    layers_path: Optional[str] = LAYERS_PATH_OPT,
    dtype: str = typer.Option("auto"),
    config: Optional[Path] = CONFIG_OPT,
) -> None:
    """Extract P2S vectors and context features for a dataset.

    Example: `l2s extract --out runs/ext --dataset demo --behaviour safety_refusal --layers 10,12`
    """
    v = _apply_config(ctx, config, dict(locals()))
    from learn2steer.behaviours import load_behaviour
    from learn2steer.benchmarks.datasets import load_dataset
    from learn2steer.vectors import extract as run_extract

    examples = load_dataset(v["dataset"], image_dir=v["image_dir"], mmsb_images=v["mmsb_images"],
                            question_field=v["question_field"], tiny=v["tiny"], limit=v["limit"])
    handle = _load(v["model"], v["layers_path"], v["dtype"])
    out_p = Path(v["out"])
    _write_settings(out_p, "extract", v)
    steer_layers = _ints(v["layers"])
    ex = run_extract(handle, load_behaviour(v["behaviour"]), examples, out_p, steer_layers=steer_layers,
                     context_layers=_ints(v["context_layers"]) or steer_layers, batch_size=v["batch_size"],
                     shard_size=v["shard_size"])
    typer.echo(f"extracted {len(ex.ids)} examples -> {out_p} (z at layers {sorted(ex.z)}, h at {sorted(ex.h)})")


@app.command()
def train(
    ctx: typer.Context,
    extraction: Path = typer.Option(..., help="Folder written by `l2s extract`."),
    out: Path = typer.Option(..., help="Artifacts folder: l2s/, mean/, mean_ba/ are written inside."),
    layer: Optional[int] = typer.Option(None, help="Steering layer L* (default: the first extracted)."),
    context_layer: Optional[int] = typer.Option(None, help="Context layer L' (default: L*)."),
    hidden: int = typer.Option(100, help="Width K of the L2S network."),
    epochs: int = typer.Option(100),
    lr: float = typer.Option(1e-3),
    batch_size: int = typer.Option(64),
    val_fraction: float = typer.Option(0.1),
    l1: float = typer.Option(0.0, help="Weight of an L1 loss term."),
    cosine: float = typer.Option(0.0, help="Weight of a (1 - cosine) loss term."),
    svd_init: bool = typer.Option(False, help="Initialise the decoder from a truncated SVD of the targets."),
    rescale: bool = typer.Option(True, help="Rescale targets to the behaviour's rescale_group mean norm."),
    ids_file: Optional[Path] = typer.Option(None, help="JSON list (or split.json's 'train') of ids to train on."),
    alpha: float = typer.Option(1.0, help="Default strength stored in the artifacts."),
    scope: str = typer.Option("all", help="all | prompt | generated"),
    seed: int = typer.Option(0),
    config: Optional[Path] = CONFIG_OPT,
) -> None:
    """Train the L2S predictor (and build Mean-S / Mean-S(BA)) from extracted vectors; no model needed.

    Example: `l2s train --extraction runs/ext --out runs/art --layer 12`
    """
    v = _apply_config(ctx, config, dict(locals()))
    from learn2steer.predictor import TrainConfig
    from learn2steer.training import save_artifacts, train_artifacts
    from learn2steer.vectors import load_extraction

    ex = load_extraction(v["extraction"])
    layer_ = v["layer"] if v["layer"] is not None else sorted(ex.z)[0]
    ctx_layer = v["context_layer"] if v["context_layer"] is not None else layer_
    ids = None
    if v["ids_file"]:
        data = json.loads(Path(v["ids_file"]).read_text())
        ids = data["train"] if isinstance(data, dict) else data
    spec = json.loads((Path(v["extraction"]) / "index.json").read_text()).get("behaviour_spec", {})
    cfg = TrainConfig(hidden=v["hidden"], epochs=v["epochs"], lr=v["lr"], batch_size=v["batch_size"],
                      val_fraction=v["val_fraction"], l1=v["l1"], cosine=v["cosine"], svd_init=v["svd_init"],
                      seed=v["seed"])
    arts, result = train_artifacts(ex, steer_layer=layer_, context_layer=ctx_layer, cfg=cfg, ids=ids,
                                   rescale_group=spec.get("rescale_group") if v["rescale"] else None,
                                   alpha=v["alpha"], scope=v["scope"])
    out_p = Path(v["out"])
    _write_settings(out_p, "train", v)
    paths = save_artifacts(arts, out_p)
    (out_p / "training_history.json").write_text(json.dumps(result.history))
    typer.echo(f"best validation loss {result.best_val_loss:.4g} at epoch {result.best_epoch}; "
               f"artifacts: {', '.join(str(p) for p in paths.values())}")


@app.command()
def generate(
    ctx: typer.Context,
    model: str = MODEL_OPT,
    prompt: list[str] = typer.Option([], "--prompt", "-p", help="A user prompt (repeatable)."),
    image: list[str] = typer.Option([], "--image", help="An image per prompt (repeatable, same order)."),
    dataset: Optional[str] = typer.Option(None, help="Answer a dataset instead (see `extract --dataset`)."),
    image_dir: Optional[str] = typer.Option(None),
    limit: Optional[int] = typer.Option(None),
    artifact: Optional[Path] = typer.Option(None, help="A steering artifact folder (l2s, mean or mean_ba)."),
    method: str = typer.Option("", help="no_steering | prompt (when no artifact is given)."),
    instruction: str = typer.Option("", help="Instruction for the prompt method (default: the behaviour's)."),
    behaviour: str = typer.Option("safety"),
    alpha: Optional[float] = typer.Option(None, help="Strength (default: the artifact's)."),
    scope: Optional[str] = typer.Option(None, help="all | prompt | generated (default: the artifact's)."),
    max_new_tokens: int = typer.Option(200),
    batch_size: int = typer.Option(8),
    out: Optional[Path] = typer.Option(None, help="Write answers as JSON lines here (settings.json beside it)."),
    layers_path: Optional[str] = LAYERS_PATH_OPT,
    config: Optional[Path] = CONFIG_OPT,
) -> None:
    """Answer prompts (or a dataset) with a chosen method and strength; greedy decoding.

    Example: `l2s generate -p "How do I make a bomb?" --artifact runs/art/l2s --alpha 1.0`
    """
    v = _apply_config(ctx, config, dict(locals()))
    from learn2steer.artifacts import SteeringArtifact
    from learn2steer.behaviours import Example, load_behaviour
    from learn2steer.benchmarks.datasets import load_dataset
    from learn2steer.methods import MethodConfig, generate_with

    if v["dataset"]:
        examples = load_dataset(v["dataset"], image_dir=v["image_dir"], limit=v["limit"])
    else:
        if not v["prompt"]:
            raise typer.BadParameter("give --prompt (repeatable) or --dataset")
        if v["image"] and len(v["image"]) != len(v["prompt"]):
            raise typer.BadParameter("give one --image per --prompt, or none")
        imgs = v["image"] or [None] * len(v["prompt"])
        examples = [Example(str(i), p, im) for i, (p, im) in enumerate(zip(v["prompt"], imgs))]
    handle = _load(v["model"], v["layers_path"])
    if v["artifact"]:
        cfg = MethodConfig.from_artifact(SteeringArtifact.load(v["artifact"], handle), alpha=v["alpha"],
                                         scope=v["scope"])
    else:
        m = v["method"] or "no_steering"
        if m not in ("no_steering", "prompt"):
            raise typer.BadParameter(f"method {m!r} needs --artifact (train one with `l2s train`)")
        cfg = MethodConfig(method=m, prompt=v["instruction"] or load_behaviour(v["behaviour"]).prompt)
    answers = generate_with(handle, cfg, examples, batch_size=v["batch_size"], max_new_tokens=v["max_new_tokens"])
    if v["out"]:
        out_p = Path(v["out"])
        _write_settings(out_p.parent, "generate", v)
        with out_p.open("w") as f:
            for e, a in zip(examples, answers):
                f.write(json.dumps({"id": e.id, "question": e.question, "response": a}) + "\n")
    for e, a in zip(examples, answers):
        typer.echo(f"[{e.id}] {e.question}\n  -> {a}\n")


@app.command(name="eval")
def eval_(
    ctx: typer.Context,
    out: Path = typer.Option(..., help="Run folder (resumable): split, extraction, artifacts, cells, tables, plots."),
    model: str = MODEL_OPT,
    task: str = typer.Option("safety", help="safety | pope | chair"),
    dataset: str = DATASET_OPT,
    behaviour: str = typer.Option("safety"),
    image_dir: Optional[str] = typer.Option(None),
    mmsb_images: str = typer.Option("none"),
    question_field: Optional[str] = typer.Option(None),
    tiny: bool = typer.Option(False),
    limit: Optional[int] = typer.Option(None),
    methods: str = typer.Option("no_steering,prompt,mean,mean_ba,norm_random,l2s,p2s"),
    layers: str = typer.Option("10", help="Steering layers L* to sweep."),
    context_layer: Optional[int] = typer.Option(None, help="L' for every L* (default: L' = L*)."),
    train_dataset: Optional[str] = typer.Option(None, help="Train on this dataset and test on all of --dataset."),
    alphas: str = typer.Option("0.5,1.0"),
    scope: str = typer.Option("all"),
    test_fraction: float = typer.Option(0.5),
    seed: int = typer.Option(0),
    epochs: int = typer.Option(100),
    judge: str = typer.Option("keyword", help="keyword | llamaguard:PATH | http:BASE_URL#MODEL (safety task)."),
    chair_gt: Optional[Path] = typer.Option(None, help="CHAIR ground truth (json or json.gz)."),
    chair_synonyms: Optional[Path] = typer.Option(None, help="CHAIR synonyms.txt."),
    max_new_tokens: int = typer.Option(64),
    batch_size: int = typer.Option(8),
    layers_path: Optional[str] = LAYERS_PATH_OPT,
    config: Optional[Path] = CONFIG_OPT,
) -> None:
    """Run a benchmark grid (methods x layers x alphas) with judges and metrics; writes table.md and plots.

    Example: `l2s eval --out runs/mmsb --task safety --dataset mmsb:../shared/data/mmsafetybench --tiny`
    """
    v = _apply_config(ctx, config, dict(locals()))
    from learn2steer.evaluation import EvalConfig, run_eval

    out_p = Path(v["out"])
    _write_settings(out_p, "eval", v)
    cfg = EvalConfig(model=v["model"], task=v["task"], dataset=v["dataset"], behaviour=v["behaviour"],
                     train_dataset=v["train_dataset"],
                     image_dir=v["image_dir"], mmsb_images=v["mmsb_images"], question_field=v["question_field"],
                     tiny=v["tiny"], limit=v["limit"],
                     methods=[m.strip() for m in v["methods"].split(",") if m.strip()],
                     layers=_ints(v["layers"]), context_layer=v["context_layer"], alphas=_floats(v["alphas"]),
                     scope=v["scope"], test_fraction=v["test_fraction"], seed=v["seed"], epochs=v["epochs"],
                     judge=v["judge"], chair_gt=v["chair_gt"], chair_synonyms=v["chair_synonyms"],
                     max_new_tokens=v["max_new_tokens"], batch_size=v["batch_size"], layers_path=v["layers_path"])
    table = run_eval(cfg, out_p)
    typer.echo(table)


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Output folder (results.json, report.md, rates.png)."),
    quick: bool = typer.Option(False, help="A smaller split and grid (about 4 minutes on 2 CPU cores)."),
    behaviour: str = typer.Option("safety_refusal", help="Behaviour spec (the paper's `safety` is also shipped)."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads."),
) -> None:
    """The whole pipeline on the embedded SmolLM2-135M-Instruct: extract, select, train, evaluate.

    Example: `l2s demo --out runs/demo --quick`
    """
    from learn2steer.demo import DemoConfig, run_demo

    cfg = (DemoConfig.quick_config(out, behaviour=behaviour, threads=threads) if quick
           else DemoConfig(out=out, behaviour=behaviour, threads=threads))
    res = run_demo(cfg)
    typer.echo((out / "report.md").read_text())
    typer.echo(json.dumps({"checks": res["checks"], "timings_s": res["timings_s"]}, indent=1))


@app.command()
def configs() -> None:
    """List the shipped configs (the paper's settings for LLaVA-1.5-7B and Qwen2-VL-7B)."""
    for p in sorted(resources.files("learn2steer.data.configs").iterdir(), key=lambda p: p.name):
        if p.name.endswith(".yaml"):
            first = p.read_text().splitlines()[0].lstrip("# ")
            typer.echo(f"{p.name}: {first}")


def _read_keyed_jsonl(path: Path, key: str, value: Callable[[dict], Any]) -> tuple[dict[str, Any], int]:
    """{str(row[key]): value(row)} from JSON lines, plus the count of unreadable lines (reported, not fatal)."""
    out: dict[str, Any] = {}
    bad = 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            out[str(r[key])] = value(r)
        except (json.JSONDecodeError, KeyError, TypeError):
            bad += 1
    return out, bad


@score_app.command("pope")
def score_pope(
    questions: Path = typer.Option(..., help="POPE questions (JSON lines with question_id, label)."),
    answers: Path = typer.Option(..., help="Answers: JSON lines with question_id and text (or answer)."),
    out: Path = typer.Option(..., help="Metrics JSON."),
) -> None:
    """POPE accuracy / precision / recall / F1 / yes-ratio of existing answers.

    Example: `l2s score pope --questions coco_pope_random.json --answers answers.jsonl --out m.json`
    """
    from learn2steer.benchmarks.metrics import pope_accuracy_first15, pope_metrics

    labels = {}
    for line in questions.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            labels[str(r["question_id"])] = str(r["label"]).lower()
    got, bad_lines = _read_keyed_jsonl(answers, "question_id", lambda r: r.get("text", r.get("answer")))
    ids = list(labels)
    answers_list = [got.get(i) for i in ids]
    m = pope_metrics([labels[i] for i in ids], answers_list)
    res = {**m, "missing": sum(a is None for a in answers_list), "bad_lines": bad_lines,
           "extra": len(set(got) - set(labels)),
           "paper_variant": pope_accuracy_first15([labels[i] for i in ids], answers_list)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    typer.echo(json.dumps(res, indent=1))
    if res["missing"] or res["unparsed"] or bad_lines:
        typer.echo(f"note: {res['missing']} questions had no answer and {res['unparsed']} answers were not yes/no; "
                   "both count as wrong", err=True)


@score_app.command("chair")
def score_chair(
    captions: Path = typer.Option(..., help="JSON lines with image_id and caption."),
    gt: Path = typer.Option(..., help="Ground-truth object sets (coco2014_chair_gt_objects.json.gz)."),
    synonyms: Path = typer.Option(..., help="CHAIR synonyms.txt."),
    out: Path = typer.Option(..., help="Metrics JSON."),
) -> None:
    """CHAIR_s, CHAIR_i and object recall of existing captions.

    Example: `l2s score chair --captions caps.jsonl --gt ../shared/data/chair/coco2014_chair_gt_objects.json.gz
    --synonyms ../shared/data/chair/synonyms.txt --out m.json`
    """
    from learn2steer.benchmarks.metrics import ChairEvaluator

    ev = ChairEvaluator.from_files(gt, synonyms)
    caps, bad_lines = _read_keyed_jsonl(captions, "image_id", lambda r: r.get("caption"))
    res = {**ev.evaluate(caps), "bad_lines": bad_lines}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    typer.echo(json.dumps(res, indent=1))
    if res["empty"] or bad_lines:
        typer.echo(f"note: {res['empty']} empty captions (counted, no objects) and {bad_lines} unreadable lines",
                   err=True)


