"""Models: load a checkpoint, find its language model's decoder blocks, build chat-template batches."""

from learn2steer.models.loading import ModelHandle, load_default_model, load_model, make_handle
from learn2steer.models.prompts import Batch, PromptRow, build_inputs

__all__ = ["Batch", "ModelHandle", "PromptRow", "build_inputs", "load_default_model", "load_model", "make_handle"]
