"""Serving the deployed model: an OpenAI-compatible HTTP server with request batching, alias
reloads, a PII-scrubbed traffic log and a human-feedback endpoint.

- :mod:`airloom.serving.engine` loads a registry version (manifest-verified), batches generation on
  one worker thread and swaps in a new version when the alias moves; :class:`ServingEngine` there is
  what the app needs of any engine.
- :mod:`airloom.serving.upstream` is the other engine: a gateway that forwards generation to an
  OpenAI-compatible server (vLLM, TGI, SGLang, another ``airloom serve``), one it starts on each
  version the alias points to or one already running.
- :mod:`airloom.serving.logs` appends traffic and feedback records to daily JSONL partitions.
- :mod:`airloom.serving.app` is the FastAPI app; :func:`airloom.serving.app.serve` runs it with uvicorn.
- :mod:`airloom.serving.auth` reads the API keys (file, env, the ``airloom_serving`` connection's
  env var) and keeps their sha256 digests; :mod:`airloom.serving.metrics` is ``/metrics``.

No Airflow imports here; torch/transformers are imported when a model (or a tokenizer) is loaded.
"""
