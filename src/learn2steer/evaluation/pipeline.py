"""``l2s eval`` and ``l2s demo``: one pipeline from a dataset to a report.

split -> P2S extraction -> (optional) choose layer and alpha on a validation part of the training
split -> train L2S / Mean-S / Mean-S(BA) on the training split -> the methods x layers x alphas grid on
the test split -> table, plots, report. The test split is touched once, at the end. Every stage writes
its results into the run folder and is skipped or resumed when the same command runs again; a
changed split or changed settings are errors or recomputations, never a silent mix.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from learn2steer._io import FolderLock, write_json
from learn2steer._version import __version__
from learn2steer.artifacts import PREDICTORS, SteeringArtifact
from learn2steer.behaviours import BehaviourSpec, Example, load_behaviour
from learn2steer.distributed import Ranks, ranks
from learn2steer.engines import Engine, EngineName, make_engine
from learn2steer.errors import InvalidInputError
from learn2steer.evaluation.data import DataOptions
from learn2steer.evaluation.datasets import (
    SPLITTERS,
    SplitName,
    by_ids,
    dataset_kind,
    namespaced,
    save_split,
    stratified_split,
)
from learn2steer.evaluation.grid import REFERENCE, Cell, CellResult, grid, run_grid, unique_inputs
from learn2steer.evaluation.judges import CachedJudge, make_judge
from learn2steer.evaluation.report import write_report
from learn2steer.evaluation.tasks import TASKS, Task, TaskOptions, make_task, task_class
from learn2steer.extraction import Extraction, extract
from learn2steer.methods import (
    METHODS,
    PAPER_METHODS,
    MethodConfig,
    artifacts_for,
    config_for,
    method,
    scales_artifact,
)
from learn2steer.models.loading import ModelHandle, ModelOptions
from learn2steer.predictor import TrainConfig
from learn2steer.rules import ScopeName, StrengthName, check_alphas
from learn2steer.training import save_artifacts, target_scales, train_artifacts


@dataclass
class EvalConfig(ModelOptions, DataOptions, TaskOptions):
    """Settings of one evaluation run; the CLI's options are these fields (``--train-*`` for ``train``), each
    dataset kind's and each task's own options included (:class:`DataOptions`, :class:`TaskOptions`)."""

    out: Path | None = field(default=None, metadata={"help": "Run folder (resumable): split, extraction, "
                                                              "artifacts, cells, table, plots, report."})
    task: str = field(default="safety", metadata={"help": "A registered task: " + " | ".join(TASKS) + "."})
    train_dataset: str | None = field(default=None, metadata={
        "help": "Train on this dataset and test on all of --dataset (ids are namespaced 'train:')."})
    behaviour: str | None = field(default=None, metadata={
        "help": "Behaviour spec (default: the dataset's, e.g. hallucination_text for textpope, else the task's: "
                "safety or hallucination)."})
    methods: list[str] = field(default_factory=lambda: list(PAPER_METHODS), metadata={
        "help": "Methods to run: " + ", ".join(METHODS) + "."})
    layers: list[int] = field(default_factory=lambda: [10], metadata={"help": "Steering layers L* to sweep."})
    context_layer: int | None = field(default=None, metadata={"help": "L' for every L* (default: L' = L*)."})
    alphas: list[float] = field(default_factory=lambda: [0.5, 1.0], metadata={"help": "Strengths to sweep."})
    scope: ScopeName = field(default="all", metadata={"help": "all | prompt | generated (the paper: all)."})
    strength: StrengthName = field(default="absolute", metadata={
        "help": "What the alphas measure: absolute (alpha * v, the paper) | relative (a fraction of each "
                "position's residual-stream norm)."})
    test_fraction: float = field(default=0.5, metadata={"help": "Share of examples held out for the test split."})
    split: Literal["auto", SplitName] = field(default="auto", metadata={
        "help": "How to split one dataset: category (stratified), image (all questions of an image on one side), "
                "permutation (the official code's numpy shuffle: exact paper splits with its seed), or auto (the "
                "task's: image for POPE)."})
    train_limit: int | None = field(default=None, metadata={"help": "Stratified subsample of the training split."})
    test_limit: int | None = field(default=None, metadata={"help": "Stratified subsample of the test split."})
    seed: int = field(default=0, metadata={"help": "Seed of splits, training and Norm-Rnd."})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "L2S training settings.",
                                                                      "prefix": "train"})
    artifacts: list[str] = field(default_factory=list, metadata={
        "help": "METHOD=PATH[,METHOD=PATH]: evaluate these artifacts instead of the ones trained here (e.g. "
                "l2s=DIR, the paper's released predictor from `l2s import-official`); each must be of the kind "
                "METHOD steers with and its L* among --layers."})
    l2s_artifact: str | None = field(default=None, metadata={
        "help": "The 0.3 spelling of --artifacts l2s=PATH."})
    rescale: bool = field(default=True, metadata={
        "help": "Rescale L2S targets per contrast group to the behaviour's rescale_group (official)."})
    gate: bool = field(default=False, metadata={
        "help": "Learn a norm gate for L2S (beyond the paper; needs zero-contrast inputs)."})
    select: bool = field(default=False, metadata={
        "help": "Choose layer and alpha per method on a validation part of the training split."})
    select_fraction: float = field(default=0.35, metadata={"help": "Share of the training split used to choose."})
    judge: str = field(default="keyword", metadata={
        "help": "keyword | llamaguard:PATH (paper mode) | llamaguard-qa:PATH | http://HOST/v1#MODEL"})
    judge_api_key: str | None = field(default=None, metadata={"help": "API key of an HTTP judge."})
    reuse: Path | None = field(default=None, metadata={
        "help": "Reuse another run's trained artifacts and chosen (layer, alpha) instead of extracting, choosing and "
                "training here (e.g. CHAIR with the vectors tuned on POPE, as the paper does)."})
    engine: EngineName = field(default="hf", metadata={"help": "hf | vllm (the serving extra)."})
    max_new_tokens: int = field(default=64, metadata={"help": "New tokens per answer (greedy)."})
    batch_size: int = field(default=8, metadata={"help": "Generation and extraction batch size."})

    def __post_init__(self) -> None:
        super().__post_init__()  # the fixed choices: task, scope, strength, split, safety_rule, engine, dtype
        if not self.methods:
            raise InvalidInputError("give at least one method")
        for m in self.methods:
            method(m)
        if len(set(self.methods)) != len(self.methods):
            raise InvalidInputError(f"methods are listed twice: {self.methods}")
        if not self.layers:
            raise InvalidInputError("give at least one steering layer")
        if not self.alphas:
            raise InvalidInputError("give at least one strength (--alphas)")
        check_alphas(self.alphas)
        if not 0 < self.select_fraction < 1:
            raise InvalidInputError(f"select_fraction must be between 0 and 1, got {self.select_fraction}")
        for name in ("max_new_tokens", "batch_size", "train_limit", "test_limit"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise InvalidInputError(f"{name} must be a whole number >= 1, got {v!r}")
        task_class(self.task).check(self.task_options(self.task))  # an unknown task, or options it cannot run with
        given_artifacts(self)  # each METHOD=PATH names a listed method that steers with an artifact


@dataclass
class EvalResult:
    """What a finished run produced (also on disk in the run folder)."""

    out: Path
    results: list[CellResult]
    task: Task
    test: list[Example]
    chosen: dict[str, tuple[int, float]] = field(default_factory=dict)
    selection: list[CellResult] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def records(self) -> list[dict[str, Any]]:
        """Every cell as the JSON record kept in ``results.json``."""
        return [r.record() for r in self.results]

    def by_method(self) -> dict[str, CellResult]:
        """The result of each method (one cell per method after selection; else the last one)."""
        return {r.cell.method: r for r in self.results}


def subsample(examples: Sequence[Example], n: int | None, seed: int) -> list[Example]:
    """A stratified subsample of about ``n`` examples (keeps every category), in the original order."""
    if n is None or n >= len(examples):
        return list(examples)
    _, keep = stratified_split(examples, test_fraction=n / len(examples), seed=seed + 1)
    order = {e.id: k for k, e in enumerate(examples)}
    return by_ids(examples, sorted(keep, key=order.__getitem__))


def split_data(cfg: EvalConfig, task: Task, out: Path) -> tuple[list[Example], list[Example]]:
    """Train and test examples, saved in ``split.json`` (a changed split of an existing run is an error)."""
    examples = cfg.load()
    if cfg.train_dataset:
        train = namespaced(cfg.load(cfg.train_dataset, limit=False), "train")
        clash = {e.id for e in train} & {e.id for e in examples}
        if clash:
            raise InvalidInputError(f"train and test ids collide (e.g. {sorted(clash)[:3]}); rename the test ids")
        test = examples
        how = f"separate training dataset {cfg.train_dataset}"
    else:
        how = task.default_split if cfg.split == "auto" else cfg.split
        tr, te = SPLITTERS[how](examples, test_fraction=cfg.test_fraction, seed=cfg.seed)
        train, test = by_ids(examples, tr), by_ids(examples, te)
    train = subsample(train, cfg.train_limit, cfg.seed)
    test = subsample(test, cfg.test_limit, cfg.seed)
    if not train or not test:
        raise InvalidInputError(f"the split left {len(train)} training and {len(test)} test examples; use more data "
                                "or another --test-fraction")
    save_split(out / "split.json", {"how": how, "seed": cfg.seed, "test_fraction": cfg.test_fraction,
                                    "train": [e.id for e in train], "test": [e.id for e in test]})
    return train, test


def given_artifacts(cfg: EvalConfig) -> dict[str, str]:
    """``--artifacts`` (and its 0.3 spelling ``--l2s-artifact``) as {method: path}, each method one that is run
    here and steers with a trained artifact."""
    pairs = list(cfg.artifacts) + ([f"l2s={cfg.l2s_artifact}"] if cfg.l2s_artifact else [])
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, path = str(pair).partition("=")
        if not sep or not name or not path:
            raise InvalidInputError(f"--artifacts takes METHOD=PATH (e.g. l2s=runs/official/llava-pope), got {pair!r}")
        m = method(name)
        if m.source != "artifact":
            raise InvalidInputError(f"--artifacts {pair}: {name} steers with no trained artifact (it is "
                                    f"{m.source}-based); give one of "
                                    f"{', '.join(k for k, v in METHODS.items() if v.source == 'artifact')}")
        if name not in cfg.methods:
            raise InvalidInputError(f"--artifacts {pair}: {name} is not among --methods; add it")
        if name in out:
            raise InvalidInputError(f"--artifacts gives {name} twice; give one artifact per method")
        out[name] = path
    return out


def _load_given(cfg: EvalConfig, handle: ModelHandle) -> list[tuple[str, SteeringArtifact]]:
    """The artifacts to evaluate instead of the trained ones (``--artifacts``), each checked against the model,
    the kind its method steers with and the swept layers; as (the trained artifact it replaces, artifact)."""
    arts = []
    for name, path in given_artifacts(cfg).items():
        art = SteeringArtifact.load(path, handle)
        slot = METHODS[name].artifact or ""
        kind = slot if slot in PREDICTORS else "fixed"  # a predictor's slot takes its kind; another, any vector
        if art.kind != kind:
            raise InvalidInputError(f"--artifacts {name}={path} is a {art.kind} artifact; {name} steers with "
                                    f"{kind} artifacts")
        if art.steer_layers[0] not in cfg.layers:
            raise InvalidInputError(f"--artifacts {name}={path} steers layer {art.steer_layers[0]}; add it to "
                                    f"--layers (now {cfg.layers})")
        arts.append((slot, art))
    return arts


def _train_layers(ex: Extraction, ids: Sequence[str], cfg: EvalConfig, spec: BehaviourSpec, layers: Sequence[int],
                  folder: Path, job: Ranks, progress: bool) -> dict[int, dict[str, SteeringArtifact]]:
    """Artifacts per steering layer, trained on ``ids`` by rank 0 and loaded back by every rank."""
    arts: dict[int, dict[str, SteeringArtifact]] = {}
    for layer in layers:
        ctx = cfg.context_layer if cfg.context_layer is not None else layer
        if job.is_main:
            trained, _ = train_artifacts(ex, steer_layer=layer, context_layer=ctx, cfg=cfg.train, ids=list(ids),
                                         rescale_group=spec.rescale_group if cfg.rescale else None, scope=cfg.scope,
                                         gate=cfg.gate, progress=progress, train=artifacts_for(cfg.methods))
            save_artifacts(trained, folder / f"L{layer}")
    job.barrier()
    for layer in layers:
        d = folder / f"L{layer}"
        arts[layer] = {p.name: SteeringArtifact.load(p) for p in sorted(d.iterdir()) if (p / "config.json").exists()}
    return arts


def _configure(cfg: EvalConfig, spec: BehaviourSpec, arts: dict[int, dict[str, SteeringArtifact]],
               ex: Extraction | None, scales: dict[int, dict[str, float]] | None = None
               ) -> Callable[[Cell], MethodConfig]:
    def configure(cell: Cell) -> MethodConfig:
        layer = cell.layer
        return config_for(cell.method, alpha=cell.alpha, scope=cfg.scope,
                          artifacts=arts.get(layer) if layer is not None else None, extraction=ex, layer=layer,
                          prompt=spec.prompt, prompt_placement=spec.prompt_placement, seed=cfg.seed,
                          strength=cfg.strength,
                          p2s_scales=(scales or {}).get(layer) if layer is not None else None)
    return configure


def run_eval(cfg: EvalConfig, *, handle: ModelHandle | None = None, progress: bool = True,
             title: str | None = None, intro: str = "", sections: Callable[[EvalResult], list[str]] | None = None
             ) -> EvalResult:
    """Run the whole evaluation into ``cfg.out``; ``handle`` skips loading ``cfg.model``."""
    if cfg.out is None:
        raise InvalidInputError("give an output folder (--out, or `out:` in the config file)")
    out = Path(cfg.out)
    job = ranks()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    with FolderLock(out, "evaluation", name=f".lock-rank{job.rank}"):
        kind = task_class(cfg.task)
        spec = load_behaviour(cfg.behaviour or dataset_kind(cfg.train_dataset or cfg.dataset)[0].behaviour
                              or kind.default_behaviour)
        judge = make_judge(cfg.judge, api_key=cfg.judge_api_key) if kind.needs_judge else None
        task = make_task(cfg.task, spec=spec, judge=CachedJudge(judge, out / "judge_cache.jsonl") if judge else None,
                         options=cfg)
        skipped = [m for m in cfg.methods if not task.admits(METHODS[m])]
        methods = [m for m in cfg.methods if m not in skipped]
        if job.is_main:
            write_json(out / "settings.json", {"command": "eval", "version": __version__, **_plain(cfg),
                                               "skipped_methods": skipped})
        train, test = split_data(cfg, task, out)
        if handle is None:
            handle = cfg.load_model()
        timings["load"] = time.perf_counter() - t0
        # layer indices are normalised once, here (negative ones count from the end), on a copy: the caller's
        # config is left as given
        cfg = replace(cfg, layers=sorted({handle.check_layer(x) for x in cfg.layers}),
                      context_layer=None if cfg.context_layer is None else handle.check_layer(cfg.context_layer))
        given = _load_given(cfg, handle)
        steering = [m for m in methods if METHODS[m].steers]
        per_input = any(METHODS[m].per_input for m in methods)
        distinct_test = unique_inputs(test)  # the test inputs the grid answers and per-input methods extract
        ctx_layers = [cfg.context_layer] if cfg.context_layer is not None else cfg.layers
        ex = None
        reused = _reused(cfg, steering) if cfg.reuse else None
        if steering and reused is None:
            t = time.perf_counter()
            # per-input methods need the test inputs' own vectors: one per distinct input, as the grid answers
            train_ids = {x.id for x in train}
            to_extract = train + ([e for e in distinct_test if e.id not in train_ids] if per_input else [])
            ex = extract(handle, spec, to_extract, out / "extraction", steer_layers=cfg.layers,
                         context_layers=ctx_layers, batch_size=cfg.batch_size, progress=progress)
            timings["extract"] = time.perf_counter() - t
        engine = make_engine(cfg.engine, cfg, handle=handle, lazy=True)  # vLLM: started on first use
        chosen: dict[str, tuple[int, float]] = {}
        selection: list[CellResult] = []
        if reused is not None:
            chosen = reused[1]
        elif cfg.select and steering:
            assert ex is not None
            t = time.perf_counter()
            chosen, selection = _select(cfg, spec, task, engine, ex, train, steering, out, job, progress)
            timings["select"] = time.perf_counter() - t
        t = time.perf_counter()
        layers = sorted({c[0] for c in chosen.values()}) if chosen else list(cfg.layers)
        arts = reused[0] if reused is not None else (
            _train_layers(ex, [e.id for e in train], cfg, spec, layers, out / "artifacts", job, progress)
            if steering and ex is not None else {})
        # P2S uses the targets of the artifacts trained here, also when a given artifact is evaluated instead
        source = next((a for a in (scales_artifact(METHODS[m]) for m in methods) if a), None)
        scales = {layer: target_scales(at_layer.get(source or ""), layer) for layer, at_layer in arts.items()}
        for slot, art in given:
            arts.setdefault(art.steer_layers[0], {})[slot] = art
        timings["train"] = time.perf_counter() - t
        if chosen:
            cells = [Cell(m, None, 0.0) for m in methods if not METHODS[m].steers]
            cells += [Cell(m, *chosen[METHODS[m].tuned_as or m]) for m in steering]
        else:
            cells = grid(methods, cfg.layers, cfg.alphas)
        t = time.perf_counter()
        ex_test = ex.select([e.id for e in distinct_test]) if per_input and ex is not None else None
        results = run_grid(engine, test, cells, _configure(cfg, spec, arts, ex_test, scales), task, out / "test",
                           batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens, progress=progress, job=job)
        timings["test"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t0
        res = EvalResult(out, results, task, test, chosen, selection, {k: round(v, 2) for k, v in timings.items()})
        if job.is_main:
            write_json(out / "results.json", {"task": task.name, "model": handle.name, "chosen": chosen,
                                              "timings_s": res.timings, "cells": res.records})
            extra = (["## Chosen on the training split", "",
                      ", ".join(f"{m}: layer {lay}, alpha {a:g}" for m, (lay, a) in chosen.items()), ""]
                     if chosen else [])
            write_report(out, title=title or f"{task.name} on {cfg.dataset} with {handle.name}",
                         intro=intro or _intro(cfg, task, train, test, skipped), task=task, results=results,
                         examples=test, sections=extra + (sections(res) if sections else []))
        return res


def _reused(cfg: EvalConfig, steering: list[str]
            ) -> tuple[dict[int, dict[str, SteeringArtifact]], dict[str, tuple[int, float]]]:
    """The artifacts (by steering layer) and chosen cells of the run ``cfg.reuse`` (``--reuse``)."""
    from learn2steer._io import read_json

    src = Path(str(cfg.reuse))
    per_input = [m for m in steering if METHODS[m].per_input]
    if per_input:
        raise InvalidInputError(f"--reuse takes another run's trained artifacts, but {', '.join(per_input)} need a "
                                "per-input extraction of this run's data; leave them out of --methods")
    folders = sorted(p for p in (src / "artifacts").glob("L*") if p.is_dir()) if (src / "artifacts").is_dir() else []
    if not folders:
        raise InvalidInputError(f"--reuse {src} holds no trained artifacts (artifacts/L*/); give a finished run folder")
    arts = {int(d.name[1:]): {p.name: SteeringArtifact.load(p) for p in sorted(d.iterdir())
                              if (p / "config.json").exists()} for d in folders}
    chosen_file = src / "selection" / "chosen.json"
    chosen = ({k: (int(v[0]), float(v[1])) for k, v in read_json(chosen_file).items()}
              if chosen_file.exists() else {})
    unchosen = [m for m in steering if chosen and (METHODS[m].tuned_as or m) not in chosen]
    if unchosen:
        raise InvalidInputError(f"--reuse {src} chose no layer and alpha for {', '.join(unchosen)}; leave them out of "
                                "--methods or reuse a run that selected them")
    return arts, chosen


def _select(cfg: EvalConfig, spec: BehaviourSpec, task: Task, engine: Engine, ex: Extraction,
            train: list[Example], steering: list[str], out: Path, job: Ranks, progress: bool
            ) -> tuple[dict[str, tuple[int, float]], list[CellResult]]:
    """Choose (layer, alpha) per tuned method on a validation part of the training split."""
    fit_ids, val_ids = stratified_split(train, test_fraction=cfg.select_fraction, seed=cfg.seed)
    val = by_ids(train, val_ids)
    save_split(out / "selection" / "split.json", {"fit": fit_ids, "val": val_ids})
    arts = _train_layers(ex, fit_ids, cfg, spec, cfg.layers, out / "selection" / "artifacts", job, progress)
    tuned = sorted({METHODS[m].tuned_as or m for m in steering})
    cells = [Cell(REFERENCE, None, 0.0)] + [Cell(m, layer, a) for m in tuned for layer in cfg.layers
                                            for a in cfg.alphas]
    ex_val = ex.select(val_ids) if any(METHODS[m].per_input for m in tuned) else None
    sel = run_grid(engine, val, cells, _configure(cfg, spec, arts, ex_val), task, out / "selection",
                   batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens, progress=progress, job=job)
    if not job.is_main:
        sel_file = out / "selection" / "chosen.json"
        job.barrier()
        from learn2steer._io import read_json

        return {k: (int(v[0]), float(v[1])) for k, v in read_json(sel_file).items()}, []
    base = next(r.metrics for r in sel if r.cell.method == REFERENCE)
    chosen = {}
    for m in tuned:
        best = max((r for r in sel if r.cell.method == m),
                   key=lambda r: (task.objective(r.metrics, base), -r.cell.alpha))
        assert best.cell.layer is not None
        chosen[m] = (best.cell.layer, best.cell.alpha)
    write_json(out / "selection" / "chosen.json", chosen)
    job.barrier()
    return chosen, sel


def _plain(cfg: EvalConfig) -> dict[str, Any]:
    d = asdict(cfg)
    if d.get("judge_api_key"):
        d["judge_api_key"] = "***"
    return d


def _intro(cfg: EvalConfig, task: Task, train: Sequence[Example], test: Sequence[Example], skipped: list[str]) -> str:
    text = (f"Task `{task.name}`, dataset `{cfg.dataset}`, model `{cfg.model}`, engine `{cfg.engine}`, greedy "
            f"decoding, {cfg.max_new_tokens} new tokens, scope `{cfg.scope}`. Split: {len(train)} training and "
            f"{len(test)} test examples (seed {cfg.seed}).")
    if skipped:
        text += f" Not run (the task does not admit them): {', '.join(skipped)}."
    return text
