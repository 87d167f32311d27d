"""The runtime artifact registry of ``l2s serve`` over HTTP, and the steering metrics' collector (API process).

Routes (an endpoint plugin in vLLM's own protocol, :class:`vllm.plugins.endpoint_plugins.interface.EndpointPlugin`,
attached by :mod:`learn2steer.engines.vllm.serve_main`)::

    GET    /v1/steering/artifacts          every artifact requests may name (start-up and registered)
    GET    /v1/steering/artifacts/{name}   one of them
    PUT    /v1/steering/artifacts/{name}   add or replace: multipart files config.json + vectors.safetensors |
    POST   /v1/steering/artifacts/{name}       model.safetensors (as written by `l2s train` / SteeringArtifact.save)
    DELETE /v1/steering/artifacts/{name}   remove

Every call needs the header ``X-L2S-Admin-Key``: one of the keys the operator configured (``$L2S_ADMIN_KEY``, or
``$L2S_ADMIN_KEY_FILE`` / ``l2s serve --admin-key-file``: one ``KEY`` or ``LABEL KEY`` per line), compared in
constant time. vLLM's ``--api-key`` guards ``/v1`` as usual and grants nothing here. Without ``--registry`` and a
key, these routes answer 404 with a sentence saying how to turn them on.

An upload is checked against the served model (:func:`~learn2steer.engines.vllm.protocol.check_artifact`) in a
folder of its own before its name points at it; every worker then loads that folder the way it loads the
start-up artifacts (:mod:`learn2steer.engines.store`). Each change is one log line: who (the key's label), what,
when.
"""

# no `from __future__ import annotations`: FastAPI reads the handlers' annotations (``request: Request``, imported
# inside attach_router because fastapi is only in the serving environment) as objects
import asyncio
import hmac
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from learn2steer.engines.store import FILES, ArtifactStore, check_name
from learn2steer.engines.vllm import metrics
from learn2steer.engines.vllm.protocol import (
    ENV_ARTIFACTS,
    ENV_METRICS,
    EngineLimits,
    check_artifact,
    max_alpha_setting,
)
from learn2steer.errors import InvalidInputError, UserError

log = logging.getLogger("learn2steer.registry")
PREFIX = "/v1/steering/artifacts"
HEADER = "X-L2S-Admin-Key"
ENV_KEY = "L2S_ADMIN_KEY"
ENV_KEY_FILE = "L2S_ADMIN_KEY_FILE"
ENV_MAX_UPLOAD = "L2S_VLLM_MAX_UPLOAD_BYTES"
DEFAULT_MAX_UPLOAD = 64 << 20
MIN_KEY = 16
PICKLE = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def load_keys(environ: dict[str, str] | None = None) -> dict[str, str]:
    """{label: key} from ``$L2S_ADMIN_KEY`` (label ``env``) and ``$L2S_ADMIN_KEY_FILE`` (``KEY`` or ``LABEL KEY``
    per line; ``#`` comments). A key shorter than 16 characters is refused (one sentence)."""
    env = os.environ if environ is None else environ
    keys: dict[str, str] = {}
    if env.get(ENV_KEY):
        keys["env"] = env[ENV_KEY].strip()
    if env.get(ENV_KEY_FILE):
        path = Path(env[ENV_KEY_FILE])
        try:
            lines = path.read_text().splitlines()
        except OSError:
            raise InvalidInputError(f"the admin key file {path} cannot be read; give a readable file") from None
        for n, line in enumerate(lines, 1):
            parts = line.split("#", 1)[0].split()
            if not parts:
                continue
            if len(parts) > 2:
                raise InvalidInputError(f"{path} line {n}: write KEY or LABEL KEY (no spaces in either)")
            label, key = (parts[0], parts[1]) if len(parts) == 2 else (f"file:{n}", parts[0])
            keys[label] = key
    for label, key in keys.items():
        if len(key) < MIN_KEY:
            raise InvalidInputError(f"admin key {label!r} is shorter than {MIN_KEY} characters; use a long random "
                                    "key (e.g. `openssl rand -hex 32`)")
    return keys


def authenticate(given: str | None, keys: dict[str, str]) -> str | None:
    """The label of the key ``given`` matches, or None; every key is compared, each in constant time."""
    if not given:
        return None
    found = None
    for label, key in keys.items():
        if hmac.compare_digest(given.encode(), key.encode()):
            found = label
    return found


class RegistryEndpoints:
    """learn2steer's routes as a vLLM endpoint plugin (``attach_router`` then ``init_state``)."""

    name = "learn2steer"
    required_tasks = None

    def __init__(self, keys: dict[str, str]) -> None:
        from learn2steer.engines.vllm.protocol import ENV_REGISTRY

        root = os.environ.get(ENV_REGISTRY)
        self.store = ArtifactStore(root) if root else None
        self.keys = keys
        self.startup = set(_json_env(ENV_ARTIFACTS))
        self.limits: EngineLimits | None = None
        self.max_upload = int(os.environ.get(ENV_MAX_UPLOAD, DEFAULT_MAX_UPLOAD))
        if not log.handlers:  # one line per change in the server's output, whatever vLLM configured
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [learn2steer] %(message)s"))
            log.addHandler(handler)
            log.setLevel(logging.INFO)
            log.propagate = False

    @property
    def on(self) -> bool:
        return self.store is not None and bool(self.keys)

    async def init_state(self, engine_client: Any, state: Any, args: Any) -> None:
        from learn2steer.engines.vllm.plugin import _limits

        if engine_client is not None:
            self.limits = _limits(engine_client.vllm_config)
        folder = os.environ.get(ENV_METRICS)
        if folder:
            from prometheus_client import REGISTRY

            REGISTRY.register(metrics.WorkerCollector(folder))
            metrics.api()  # the counters exist (at 0) from the first scrape

    def attach_router(self, app: Any) -> None:
        from fastapi import APIRouter, Request
        from fastapi.responses import JSONResponse

        router = APIRouter()

        def error(status: int, message: str, reason: str) -> JSONResponse:
            if metrics.enabled():
                metrics.api().registry_refused.labels(reason).inc()
            return JSONResponse({"error": {"message": message, "type": "BadRequestError" if status == 400 else
                                           "RegistryError", "code": status}}, status_code=status)

        def guard(request: Request) -> tuple[str | None, JSONResponse | None]:
            if not self.on:
                return None, error(404, "the artifact registry is off on this server; start it with `l2s serve "
                                        "--registry DIR` and an admin key in $L2S_ADMIN_KEY or --admin-key-file",
                                   "off")
            given = request.headers.get(HEADER)
            if not given:
                return None, error(401, f"the artifact registry needs the admin key in the {HEADER} header",
                                   "unauthenticated")
            label = authenticate(given, self.keys)
            if label is None:
                return None, error(403, f"the {HEADER} header does not hold an admin key of this server", "wrong_key")
            return label, None

        def describe(name: str, version: str | None, folder: str, source: str) -> dict[str, Any]:
            from learn2steer._io import read_json

            cfg = read_json(Path(folder) / "config.json", what="artifact config")
            return {"name": name, "version": version, "source": source, "kind": cfg.get("kind"),
                    "method": cfg.get("method"), "model": cfg.get("model"), "steer_layers": cfg.get("steer_layers"),
                    "context_layer": cfg.get("context_layer"), "alpha": cfg.get("alpha"), "scope": cfg.get("scope")}

        def listing() -> list[dict[str, Any]]:
            out = [describe(n, None, f, "start-up") for n, f in sorted(_json_env(ENV_ARTIFACTS).items())]
            if self.store is not None:
                out += [describe(n, v, str(self.store.folder(n, v)), "registry")
                        for n, v in self.store.names().items()]
            return out

        @router.get(PREFIX)
        async def list_artifacts(request: Request) -> Any:
            _, bad = guard(request)
            if bad is not None:
                return bad
            return {"artifacts": await asyncio.to_thread(listing)}

        @router.get(PREFIX + "/{name}")
        async def get_artifact(name: str, request: Request) -> Any:
            _, bad = guard(request)
            if bad is not None:
                return bad
            for art in await asyncio.to_thread(listing):
                if art["name"] == name:
                    return art
            return error(404, f"no steering artifact {name!r} on this server", "not_found")

        async def put_artifact(name: str, request: Request) -> Any:
            label, bad = guard(request)
            if bad is not None:
                return bad
            assert self.store is not None
            try:
                check_name(name)
            except InvalidInputError as e:
                return error(400, str(e), "bad_name")
            if name in self.startup:
                return error(409, f"{name!r} is a start-up artifact of this server (--artifact); register under "
                                  "another name", "conflict")
            declared = request.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.max_upload:
                return error(413, f"the upload is {int(declared)} bytes; this server accepts at most "
                                  f"{self.max_upload} ({ENV_MAX_UPLOAD}, l2s serve --max-upload-mb)", "too_large")
            body = bytearray()
            async for chunk in request.stream():
                body += chunk
                if len(body) > self.max_upload:
                    return error(413, f"the upload is larger than this server accepts ({self.max_upload} bytes)",
                                 "too_large")
            try:
                files = await _form_files(request, bytes(body))
            except InvalidInputError as e:
                return error(400, str(e), "bad_files")
            if self.limits is None:
                return error(503, "the engine is not ready yet; try again", "not_ready")
            limits, bound = self.limits, max_alpha_setting()

            def check(folder: Path) -> None:
                check_artifact(folder, limits, name, max_alpha=bound)

            try:
                version, previous = await asyncio.to_thread(self.store.put, name, files, check)
            except (UserError, ValueError) as e:
                return error(400, str(e).splitlines()[0], "invalid_artifact")
            action = "add" if previous is None else ("replace" if previous != version else "unchanged")
            self._changed(label, action, name, version, previous)
            return JSONResponse({"name": name, "version": version, "previous": previous, "action": action},
                                status_code=201 if previous is None else 200)

        router.add_api_route(PREFIX + "/{name}", put_artifact, methods=["PUT", "POST"])

        @router.delete(PREFIX + "/{name}")
        async def delete_artifact(name: str, request: Request) -> Any:
            label, bad = guard(request)
            if bad is not None:
                return bad
            assert self.store is not None
            if name in self.startup:
                return error(409, f"{name!r} is a start-up artifact of this server (--artifact) and cannot be "
                                  "removed at runtime", "conflict")
            try:
                previous = await asyncio.to_thread(self.store.remove, name)
            except InvalidInputError as e:
                return error(400, str(e), "bad_name")
            if previous is None:
                return error(404, f"no registered steering artifact {name!r} on this server", "not_found")
            self._changed(label, "remove", name, None, previous)
            return {"name": name, "removed": previous}

        app.include_router(router)

    def _changed(self, label: str | None, action: str, name: str, version: str | None, previous: str | None) -> None:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        log.info("registry %s %s version=%s previous=%s key=%s at %s", action, name, version, previous, label, when)
        if metrics.enabled():
            metrics.api().registry.labels(action).inc()


async def _form_files(request: Any, body: bytes) -> dict[str, bytes]:
    """The upload's files ({file name: bytes}) from a multipart body already read (and size-checked)."""
    from starlette.datastructures import UploadFile
    from starlette.requests import Request

    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidInputError("send the artifact's files as multipart/form-data (curl -F config.json=@DIR/"
                                "config.json -F vectors.safetensors=@DIR/vectors.safetensors)")

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, receive).form(max_files=len(FILES) + 4, max_fields=len(FILES) + 4)
    except Exception as e:  # starlette's MultiPartException and parser errors: a malformed body
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InvalidInputError(f"the upload is not a valid multipart body ({why})") from None
    files: dict[str, bytes] = {}
    for field, value in form.multi_items():
        name = Path(value.filename).name if isinstance(value, UploadFile) and value.filename else field
        if field.lower().endswith(PICKLE) or name.lower().endswith(PICKLE):
            raise InvalidInputError(f"{field!r} looks like a pickle file, which this server never loads; send the "
                                    "artifact's safetensors files")
        if field not in FILES:
            raise InvalidInputError(f"{field!r} is not an artifact file; an upload holds only {', '.join(FILES)}")
        if field in files:
            raise InvalidInputError(f"{field!r} is given twice")
        files[field] = await value.read() if isinstance(value, UploadFile) else str(value).encode()
    if "config.json" not in files:
        raise InvalidInputError("the upload lacks config.json")
    if not {"vectors.safetensors", "model.safetensors"} & set(files):
        raise InvalidInputError("the upload lacks the tensors: vectors.safetensors (a fixed vector) or "
                                "model.safetensors (a predictor)")
    return files


def _json_env(var: str) -> dict[str, str]:
    import json

    raw = os.environ.get(var, "")
    return dict(json.loads(raw)) if raw else {}
