"""Online serving: an async engine (``AsyncLLM``), an OpenAI-compatible HTTP server
(``vllm-lite serve``) and its serving benchmark (``vllm-lite bench serve``)."""
