"""``l2s serve``: vLLM's OpenAI-compatible server with learn2steer's plugin and named artifacts preloaded.

The artifacts are checked against the model before the server starts (shape, and what vLLM can apply
in one pass); then vLLM's own server runs in this process (``python -m vllm.entrypoints.openai.api_server``,
which works where the ``vllm`` console script of the CPU build does not). A request chooses steering with
``"vllm_xargs": {"steer": "NAME", "alpha": 1.0, "scope": "all"}``; a bad choice (also ``|alpha|`` above
``--max-alpha``) is an HTTP 400.

With ``--registry DIR`` and an admin key (``$L2S_ADMIN_KEY`` or ``--admin-key-file``), artifacts can also be added,
replaced and removed at runtime over HTTP (:mod:`learn2steer.engines.vllm.admin`); those registered earlier in
DIR are checked against the model and served again after a restart. ``--inline-vectors`` accepts requests that
carry their own vectors (vllm-lens's ``apply_steering_vectors``, :mod:`learn2steer.engines.lens`). The server
process is :mod:`learn2steer.engines.vllm.serve_main` (vLLM's server plus learn2steer's routes and metrics).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from learn2steer.engines.requests import DEFAULT_MAX_ALPHA, check_max_alpha
from learn2steer.engines.store import ArtifactStore, check_name
from learn2steer.engines.vllm.admin import ENV_KEY_FILE, ENV_MAX_UPLOAD, load_keys
from learn2steer.engines.vllm.offline import engine_env
from learn2steer.engines.vllm.protocol import (
    ENV_INLINE,
    ENV_MAX_ALPHA,
    ENV_REGISTRY,
    EngineLimits,
    check_artifact,
    check_plugin_installed,
)
from learn2steer.errors import InvalidInputError
from learn2steer.models.loading import Dtype, display_name, model_shape, resolve_model_path
from learn2steer.options import check_choices


@dataclass
class ServeJob:
    """Settings of ``l2s serve``."""

    model: str = field(default="default", metadata={
        "help": "Local model folder, or an embedded model: 'default' (SmolLM2-135M-Instruct) or 'gemma3-270m'."})
    artifact: list[str] = field(default_factory=list, metadata={
        "help": "NAME=DIR: an artifact requests can select as vllm_xargs {\"steer\": NAME}.", "repeat": True})
    host: str = field(default="127.0.0.1", metadata={"help": "Address to listen on."})
    port: int = field(default=8000, metadata={"help": "Port to listen on."})
    dtype: Dtype = field(default="auto", metadata={"help": "auto (float32 on CPU) | float32 | bfloat16 | float16"})
    max_model_len: int = field(default=2048, metadata={"help": "Longest prompt + answer, in tokens."})
    chunked_prefill: bool = field(default=False, metadata={
        "help": "Split long prompts over steps (an L2S request at scope all / prompt then reads its vector in a "
                "request of its own first: its prompt is computed twice)."})
    enforce_eager: bool = field(default=False, metadata={
        "help": "No torch.compile (faster start; the plugin works either way; forced on CUDA)."})
    max_alpha: float = field(default=DEFAULT_MAX_ALPHA, metadata={
        "help": "Largest |alpha| a request may ask for (larger is an HTTP 400): a bound on how far one request "
                "may push the residual stream."})
    served_model_name: str | None = field(default=None, metadata={"help": "Model name clients send (default: the "
                                                                          "model's name)."})
    registry: str | None = field(default=None, metadata={
        "help": "Folder of artifacts registered at runtime over HTTP (PUT/DELETE /v1/steering/artifacts/NAME); "
                "needs an admin key ($L2S_ADMIN_KEY or --admin-key-file). Kept across restarts."})
    admin_key_file: str | None = field(default=None, metadata={
        "help": "File of admin keys for the artifact registry (KEY or LABEL KEY per line); or set $L2S_ADMIN_KEY."})
    max_upload_mb: float = field(default=64.0, metadata={"help": "Largest artifact upload accepted, in MB."})
    inline_vectors: bool = field(default=False, metadata={
        "help": "Accept requests carrying their own vectors (vllm-lens's apply_steering_vectors, steer_vector)."})
    max_inline_vectors: int = field(default=8, metadata={
        "help": "With --inline-vectors: most (layer, vector) pairs one request may carry."})
    vllm_args: list[str] = field(default_factory=list, metadata={
        "help": "Extra argument passed to vLLM's server as is (repeatable, e.g. --vllm-args=--max-num-seqs=64).",
        "repeat": True})

    def artifacts(self) -> dict[str, str]:
        """``--artifact NAME=DIR`` as {name: absolute folder}; malformed or repeated names are errors."""
        out: dict[str, str] = {}
        for spec in self.artifact:
            name, sep, folder = spec.partition("=")
            if not sep or not name or not folder:
                raise InvalidInputError(f"--artifact must be NAME=DIR, got {spec!r}")
            check_name(name)
            if name in out:
                raise InvalidInputError(f"artifact name {name!r} is given twice")
            out[name] = str(Path(folder).resolve())
        return out

    def command(self) -> tuple[list[str], dict[str, str]]:
        """The server's argv and environment, after checking every artifact against the model."""
        check_plugin_installed()
        arts = self.artifacts()
        name, hidden, layers = model_shape(self.model)
        limits = EngineLimits(hidden_size=hidden, num_layers=layers, chunked_prefill=self.chunked_prefill,
                              read_ahead=True)  # serve_main reads L2S vectors ahead of chunked prompts
        max_alpha = check_max_alpha(self.max_alpha)
        for art_name, folder in arts.items():
            check_artifact(folder, limits, art_name, max_alpha=max_alpha)
        extra_env = self._registry_env(limits, set(arts), max_alpha)
        dtype = self.dtype
        if dtype == "auto":
            import torch

            dtype = "auto" if torch.cuda.is_available() else "float32"
        argv = [sys.executable, "-m", "learn2steer.engines.vllm.serve_main", "--model", str(resolve_model_path(
            self.model)), "--served-model-name", self.served_model_name or name, "--host", self.host, "--port",
                str(self.port), "--dtype", dtype, "--max-model-len", str(self.max_model_len)]
        if self.chunked_prefill:
            argv.append("--enable-chunked-prefill")
        else:
            argv += ["--no-enable-chunked-prefill", "--max-num-batched-tokens", str(self.max_model_len)]
        if self.enforce_eager:
            argv.append("--enforce-eager")
        argv += list(self.vllm_args)
        env = {**os.environ, **engine_env(allow_paths=False, artifacts=arts, eager=self.enforce_eager),
               ENV_MAX_ALPHA: repr(float(self.max_alpha)), **extra_env}
        return argv, env

    def _registry_env(self, limits: EngineLimits, startup: set[str], max_alpha: float) -> dict[str, str]:
        """The registry's and inline vectors' settings for the server; registered artifacts checked again."""
        env: dict[str, str] = {}
        if self.inline_vectors:
            if self.max_inline_vectors < 1:
                raise InvalidInputError("--max-inline-vectors must be at least 1")
            env[ENV_INLINE] = json.dumps({"max_vectors": self.max_inline_vectors, "max_hidden": limits.hidden_size})
        if self.max_upload_mb <= 0:
            raise InvalidInputError("--max-upload-mb must be positive")
        env[ENV_MAX_UPLOAD] = str(int(self.max_upload_mb * (1 << 20)))
        if self.admin_key_file:
            env[ENV_KEY_FILE] = str(Path(self.admin_key_file).resolve())
        if self.registry is None:
            return env
        if not load_keys({**os.environ, **env}):
            raise InvalidInputError("--registry needs an admin key: set $L2S_ADMIN_KEY or give --admin-key-file "
                                    "(vLLM's --api-key does not grant registry changes)")
        root = Path(self.registry).resolve()
        store = ArtifactStore(root)
        for name, version in store.names().items():  # back after a restart, if it still fits this model
            if name in startup:
                raise InvalidInputError(f"{name!r} is both an --artifact and registered in {root}; rename one")
            check_artifact(store.folder(name, version), limits, name, max_alpha=max_alpha)
        env[ENV_REGISTRY] = str(root)
        return env

    def __post_init__(self) -> None:
        check_choices(self)

    def run(self) -> None:
        """Replace this process with the server (Ctrl-C stops it)."""
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise InvalidInputError("`l2s serve` needs the serving environment: bash scripts/setup.sh --serve, then "
                                    ".venv-serve/bin/l2s serve ...") from None
        argv, env = self.command()
        print(f"serving {self.served_model_name or display_name(self.model)} "
              f"on http://{self.host}:{self.port}/v1 with artifacts {sorted(self.artifacts())}", flush=True)
        os.execvpe(argv[0], argv, env)
