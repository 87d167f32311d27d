"""``l2s eval``: split, extract, train per layer, then a methods x layers x alphas grid with metrics.

Used for MM-SafetyBench (safety), POPE and CHAIR on any model. The split is saved with the run and reused
when the run is resumed; a changed split is an error, not a silent mix.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from learn2steer.behaviours import Example, load_behaviour
from learn2steer.benchmarks.datasets import by_ids, load_dataset, stratified_split
from learn2steer.benchmarks.judges import make_judge
from learn2steer.benchmarks.metrics import ChairEvaluator
from learn2steer.benchmarks.runner import Cell, grid, markdown_table, plot_vs_alpha, run_grid
from learn2steer.benchmarks.scoring import TASKS, headline, score_chair, score_pope, score_safety
from learn2steer.methods import METHODS, MethodConfig, config_for
from learn2steer.models.loading import ModelHandle, load_model
from learn2steer.predictor import TrainConfig
from learn2steer.training import save_artifacts, train_artifacts
from learn2steer.vectors import extract

PER_EXAMPLE = ("p2s", "norm_random")


@dataclass
class EvalConfig:
    model: str = "default"
    task: str = "safety"
    dataset: str = "demo"
    train_dataset: str | None = None
    behaviour: str = "safety"
    image_dir: str | None = None
    mmsb_images: str = "none"
    question_field: str | None = None
    tiny: bool = False
    limit: int | None = None
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    layers: list[int] = field(default_factory=lambda: [10])
    context_layer: int | None = None
    alphas: list[float] = field(default_factory=lambda: [0.5, 1.0])
    scope: str = "all"
    test_fraction: float = 0.5
    seed: int = 0
    epochs: int = 100
    judge: str = "keyword"
    chair_gt: str | Path | None = None
    chair_synonyms: str | Path | None = None
    max_new_tokens: int = 64
    batch_size: int = 8
    layers_path: str | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"unknown methods {bad}; choose from {', '.join(METHODS)}")
        if self.task == "chair" and (self.chair_gt is None or self.chair_synonyms is None):
            raise ValueError("task chair needs --chair-gt and --chair-synonyms")


def _split(cfg: EvalConfig, examples: list[Example], out: Path) -> tuple[list[Example], list[Example]]:
    path = out / "split.json"
    if cfg.train_dataset:
        train = load_dataset(cfg.train_dataset, image_dir=cfg.image_dir)
        split = {"train": [e.id for e in train], "test": [e.id for e in examples], "train_dataset": cfg.train_dataset}
        pairs = (train, examples)
    else:
        tr, te = stratified_split(examples, test_fraction=cfg.test_fraction, seed=cfg.seed)
        split = {"train": tr, "test": te}
        pairs = (by_ids(examples, tr), by_ids(examples, te))
    if path.exists() and json.loads(path.read_text()) != split:
        raise ValueError(f"{path} holds a different split (data, seed or test fraction changed); use a new --out")
    path.write_text(json.dumps(split, indent=1))
    return pairs


def run_eval(cfg: EvalConfig, out: str | Path, *, handle: ModelHandle | None = None, progress: bool = True) -> str:
    """Run the whole evaluation into ``out``; ``handle`` skips loading ``cfg.model`` (models built in memory)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    examples = load_dataset(cfg.dataset, image_dir=cfg.image_dir, mmsb_images=cfg.mmsb_images,
                            question_field=cfg.question_field, tiny=cfg.tiny, limit=cfg.limit)
    train, test = _split(cfg, examples, out)
    if handle is None:
        handle = load_model(cfg.model, layers_path=cfg.layers_path)
    spec = load_behaviour(cfg.behaviour)
    methods = list(cfg.methods)
    if cfg.task == "chair" and any(m in PER_EXAMPLE for m in methods):
        warnings.warn("p2s / norm_random need each test input's own contrast (labels); skipped for CHAIR",
                      stacklevel=2)
        methods = [m for m in methods if m not in PER_EXAMPLE]
    steered = [m for m in methods if m not in ("no_steering", "prompt")]
    ctx_layers = [cfg.context_layer] if cfg.context_layer is not None else cfg.layers
    arts: dict[int, dict] = {}
    ex_test = None
    if steered:
        to_extract = train + ([e for e in test if e.id not in {t.id for t in train}]
                              if any(m in PER_EXAMPLE for m in methods) else [])
        ex = extract(handle, spec, to_extract, out / "extraction", steer_layers=cfg.layers,
                     context_layers=ctx_layers, batch_size=cfg.batch_size, progress=progress)
        for layer in cfg.layers:
            ctx = cfg.context_layer if cfg.context_layer is not None else layer
            arts[layer], _ = train_artifacts(ex, steer_layer=layer, context_layer=ctx,
                                             cfg=TrainConfig(epochs=cfg.epochs, seed=cfg.seed),
                                             ids=[e.id for e in train], rescale_group=spec.rescale_group,
                                             scope=cfg.scope, progress=progress)
            save_artifacts(arts[layer], out / "artifacts" / f"L{layer}")
        if any(m in PER_EXAMPLE for m in methods):
            ex_test = ex.select([e.id for e in test])

    def configure(cell: Cell) -> MethodConfig:
        return config_for(cell.method, alpha=cell.alpha, layer=cell.layer, scope=cfg.scope,
                          artifacts=arts.get(cell.layer) if cell.layer is not None else None, extraction=ex_test,
                          prompt=spec.prompt, seed=cfg.seed)

    judge = make_judge(cfg.judge) if cfg.task == "safety" else None
    chair = (ChairEvaluator.from_files(cfg.chair_gt, cfg.chair_synonyms)  # type: ignore[arg-type]
             if cfg.task == "chair" else None)

    def score(cell: Cell, resp: list[str], seen: dict[str, list[str]]) -> dict:
        if cfg.task == "safety":
            return score_safety(test, resp, judge, reference=seen.get(Cell("no_steering", None, 0.0).name))  # type: ignore[arg-type]
        if cfg.task == "pope":
            return score_pope(test, resp)
        return score_chair(test, resp, chair)  # type: ignore[arg-type]

    records = run_grid(handle, test, grid(methods, cfg.layers, cfg.alphas), configure, score, out,
                       batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens, progress=progress)
    flat = [{**r, "metrics": headline(cfg.task, r["metrics"])} for r in records]
    columns: Sequence[str] = list(flat[0]["metrics"]) if flat else []
    table = markdown_table(flat, columns)
    (out / "table.md").write_text(f"# {cfg.task} on {cfg.dataset} with {handle.name}\n\n" + table)
    for c in columns:
        plot_vs_alpha(flat, c, out / "plots" / f"{c}.png", title=f"{cfg.task}: {c}")
    return table
