"""The process ``l2s serve`` becomes: vLLM's OpenAI server, with learn2steer's routes and metrics attached.

``python -m learn2steer.engines.vllm.serve_main ARGS`` takes vLLM's server arguments. Before vLLM starts any
process it reads the admin keys (and removes ``$L2S_ADMIN_KEY`` from the environment the engine's processes
inherit), makes the folder workers leave their steering counts in, and, with chunked prefill on, turns on the
read-ahead of L2S vectors for chunked prompts (:func:`~learn2steer.engines.vllm.plugin.enable_read_ahead`);
then it adds :class:`~learn2steer.engines.vllm.admin.RegistryEndpoints` to the endpoint plugins vLLM loads (vLLM's own
mechanism for extra routes, which otherwise only loads installed entry points named in ``$VLLM_PLUGINS``) and
runs vLLM's ``main``.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from typing import Any


def install() -> None:
    """Everything before vLLM's main: keys, the metrics folder, the endpoint plugin."""
    import vllm.plugins

    from learn2steer.engines.vllm.admin import ENV_KEY, RegistryEndpoints, load_keys
    from learn2steer.engines.vllm.protocol import ENV_METRICS

    keys = load_keys()
    os.environ.pop(ENV_KEY, None)  # the engine's processes need no key
    folder = tempfile.mkdtemp(prefix="l2s-metrics-")
    atexit.register(shutil.rmtree, folder, True)
    os.environ[ENV_METRICS] = folder
    plugin = RegistryEndpoints(keys)
    orig = vllm.plugins.load_endpoint_plugins

    def load_endpoint_plugins(*args: Any, **kwargs: Any) -> list[Any]:
        return [*orig(*args, **kwargs), plugin]

    vllm.plugins.load_endpoint_plugins = load_endpoint_plugins
    if "--enable-chunked-prefill" in sys.argv:  # L2S at scope all / prompt reads its vector ahead of the chunks
        from learn2steer.engines.vllm.plugin import enable_read_ahead

        enable_read_ahead()


def main() -> None:
    install()
    from vllm.entrypoints.launchers.api_server.entry import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main()
