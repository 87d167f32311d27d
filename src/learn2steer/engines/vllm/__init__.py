"""The vLLM engine: learn2steer's steering inside vLLM (plugin, offline engine, OpenAI-compatible server).

Needs the serving environment (``bash scripts/setup.sh --serve``). ``protocol`` imports no vLLM and
holds the request format, its checks and the cache salt; ``plugin`` patches vLLM; ``offline`` is the
:class:`~learn2steer.engines.Engine` for ``l2s generate/eval --engine vllm``; ``server`` is ``l2s serve``.
"""
