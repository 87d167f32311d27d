"""The data options of every command that loads a dataset: shared settings plus each registered kind's own.

:class:`DataOptions` is built from the dataset registry (:data:`~learn2steer.evaluation.datasets.DATASETS`) once
every built-in kind is registered (this module imports the modules that register them) and after the packages that
declare a ``learn2steer.datasets`` entry point are imported: each kind that declares options gets one nested group
(``--mmsb-images``, ``--chair-images``, ``--scene-few-shot``; YAML ``mmsb: {images: typo}`` or the flat
``mmsb_images: typo``), so a new kind's options reach the CLI, YAML and Python with no edit here, in the pipeline
or in the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import learn2steer.evaluation.scenes  # noqa: F401  (registers textpope / textchair)
from learn2steer.behaviours import Example
from learn2steer.evaluation.datasets import DATASETS, dataset_usage, load_dataset
from learn2steer.options import load_entry_points, with_groups

load_entry_points("learn2steer.datasets")


@dataclass
class DataOptionsBase:
    """Which examples to load: shared by ``extract``, ``generate`` and ``eval`` (CLI options of the same names)."""

    dataset: str = field(default="demo", metadata={"help": " | ".join(k.usage for k in DATASETS.values())})
    image_dir: str | None = field(default=None, metadata={
        "help": "Image folder (POPE: COCO val2014; JSONL: root of relative image paths; MM-SafetyBench: images root)."})
    limit: int | None = field(default=None, metadata={"help": "Use only the first N examples (N >= 1)."})

    def load(self, spec: str | None = None, *, limit: bool = True) -> list[Example]:
        """The examples of ``spec`` (default: ``dataset``) with these options (validated, never empty)."""
        return load_dataset(spec or self.dataset, image_dir=self.image_dir, limit=self.limit if limit else None,
                            options=self)


def _groups() -> dict[str, tuple[type, str, str]]:
    out: dict[str, tuple[type, str, str]] = {}
    for k in DATASETS.values():
        if k.options is not None and k.group is not None:
            users = [x.usage for x in DATASETS.values() if x.group == k.group]
            out.setdefault(k.group, (k.options, str(k.prefix), f"Options of {', '.join(users)}."))
    return out


if TYPE_CHECKING:
    DataOptions = DataOptionsBase
else:
    DataOptions = with_groups(DataOptionsBase, _groups(), "DataOptions")

__all__ = ["DataOptions", "DataOptionsBase", "dataset_usage"]
