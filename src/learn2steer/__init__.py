"""learn2steer: input-dependent activation steering (Learn-to-Steer) for Hugging Face LLMs and VLMs.

The public face, by stage of the pipeline (each name lives in the module of its stage):
models -> activations -> vectors -> extraction -> predictor -> steering -> artifacts / methods -> engines -> evaluation.

>>> import learn2steer as l2s
>>> h = l2s.load_model("default")                                   # doctest: +SKIP
>>> art = l2s.SteeringArtifact.load("runs/art/l2s", h)              # doctest: +SKIP
>>> l2s.generate_with(h, l2s.MethodConfig.from_artifact(art), examples)  # doctest: +SKIP
"""

from learn2steer import l2s as _l2s  # noqa: F401  registers the L2S method, its artifact kind and trainer
from learn2steer._version import __version__
from learn2steer.activations import Site, read
from learn2steer.artifacts import SteeringArtifact
from learn2steer.behaviours import BehaviourSpec, Example, load_behaviour
from learn2steer.cast import CASTNet  # also registers the CAST method, its artifact kind and trainer
from learn2steer.engines import Engine, generate_with
from learn2steer.engines.hf import HFEngine, generate
from learn2steer.errors import IncompatibleArtifactError, UserError
from learn2steer.extraction import Extraction, extract, load_extraction
from learn2steer.methods import METHODS, Method, MethodConfig, config_for
from learn2steer.models import Batch, ModelHandle, PromptRow, build_inputs, load_default_model, load_model, make_handle
from learn2steer.predictor import L2SNet, TrainConfig, TrainResult, fit
from learn2steer.rules import Scope
from learn2steer.steering import FixedVectors, PredictedVectors, VectorProvider, steer
from learn2steer.training import train_artifacts
from learn2steer.vectors import SteeringVector, mean_vector, norm_random

__all__ = [
    "__version__",
    # models
    "Batch", "ModelHandle", "PromptRow", "build_inputs", "load_default_model", "load_model", "make_handle",
    # activations
    "Site", "read",
    # behaviours, vectors and extraction
    "BehaviourSpec", "Example", "Extraction", "SteeringVector", "extract", "load_behaviour", "load_extraction",
    "mean_vector", "norm_random",
    # predictor
    "CASTNet", "L2SNet", "TrainConfig", "TrainResult", "fit", "train_artifacts",
    # steering
    "FixedVectors", "PredictedVectors", "Scope", "VectorProvider", "steer",
    # artifacts and methods
    "METHODS", "Method", "MethodConfig", "SteeringArtifact", "config_for",
    # engines
    "Engine", "HFEngine", "generate", "generate_with",
    # errors
    "IncompatibleArtifactError", "UserError",
]
