"""learn2steer: input-dependent activation steering (Learn-to-Steer) for Hugging Face LLMs and VLMs.

The pipeline, one module per stage: models (load, locate layers, build prompts) -> activations (read
hidden states) -> vectors (P2S, means, random) -> predictor (the L2S network) -> steering (apply during
generation) -> methods (every method behind one call) -> benchmarks -> cli.
"""

__version__ = "0.1.0"

from learn2steer.activations import Site, read  # noqa: E402
from learn2steer.artifacts import SteeringArtifact  # noqa: E402
from learn2steer.behaviours import BehaviourSpec, Example, load_behaviour  # noqa: E402
from learn2steer.generation import generate  # noqa: E402
from learn2steer.methods import METHODS, MethodConfig, generate_with  # noqa: E402
from learn2steer.models.loading import ModelHandle, load_default_model, load_model, make_handle  # noqa: E402
from learn2steer.models.prompts import Batch, PromptRow, build_inputs  # noqa: E402
from learn2steer.predictor import L2SNet, TrainConfig, fit  # noqa: E402
from learn2steer.steering import Scope, steer  # noqa: E402
from learn2steer.training import train_artifacts  # noqa: E402
from learn2steer.vectors import extract, load_extraction, mean_vector, norm_random  # noqa: E402

__all__ = [
    "Batch", "BehaviourSpec", "Example", "L2SNet", "METHODS", "MethodConfig", "ModelHandle", "PromptRow", "Scope",
    "Site", "SteeringArtifact", "TrainConfig", "build_inputs", "extract", "fit", "generate", "generate_with",
    "load_behaviour", "load_default_model", "load_extraction", "load_model", "make_handle", "mean_vector",
    "norm_random", "read", "steer", "train_artifacts",
]
