"""The evaluation wing: datasets, judges, metrics, one Task per benchmark, the grid, reports, the pipeline.

``run_eval`` (``l2s eval``) and ``run_demo`` (``l2s demo``) are the same pipeline with other settings.
"""

from learn2steer.evaluation.data import DataOptions
from learn2steer.evaluation.datasets import load_dataset, register_dataset
from learn2steer.evaluation.grid import Cell, CellResult, grid, run_grid
from learn2steer.evaluation.judges import HTTPJudge, KeywordJudge, LlamaGuardJudge, make_judge
from learn2steer.evaluation.pipeline import EvalConfig, EvalResult, run_eval
from learn2steer.evaluation.tasks import ChairTask, PopeTask, SafetyTask, Scores, Task, make_task, register_task

__all__ = ["Cell", "CellResult", "ChairTask", "DataOptions", "EvalConfig", "EvalResult", "HTTPJudge", "KeywordJudge",
           "LlamaGuardJudge", "PopeTask", "SafetyTask", "Scores", "Task", "grid", "load_dataset", "make_judge",
           "make_task", "register_dataset", "register_task", "run_eval", "run_grid"]
