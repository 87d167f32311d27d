"""The vLLM engine: learn2steer's steering inside vLLM (plugin, offline engine, OpenAI-compatible server).

Needs the serving environment (``bash scripts/setup.sh --serve``). The request format itself (its fields,
checks and prefix-cache salt) is engine-neutral: :mod:`learn2steer.engines.requests`. Here, ``protocol``
imports no vLLM and holds this engine's side of it: the settings read from the environment every vLLM
process inherits, and the checks against what the running engine can apply; ``plan`` is what one step
reads and writes (pure torch), ``layers`` finds and wraps the decoder layers, ``plugin`` patches vLLM;
``offline`` is the :class:`~learn2steer.engines.Engine` for ``l2s generate/eval --engine vllm``; ``server`` is
``l2s serve``.
"""
