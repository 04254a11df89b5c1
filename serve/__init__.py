"""The Ray Serve application: KV-cached generation over HTTP with continuous batching.

    engine.py        Engine: step() = schedule -> run -> postprocess (pure PyTorch; jobs/sample.py
                     and the sweep's decode measurement use it too)
    scheduler.py     admission and KV-cache rows (running requests are rows 0..n-1)
    model_runner.py  prefill / decode passes on the KV cache
    sampler.py       each row's next token with its own parameters and generator
    detokenizer.py   incremental text with stop strings (partial matches held back)
    sequence.py      one request inside the engine
    driver.py        EngineDriver: runs an engine from asyncio (the replica's event loop)
    logprobs.py      log-probabilities for `logprobs` / `echo` (the raw model), token strings
    server.py        ModelServer: one checkpoint, loaded inside the replica (LLMServer: as a
                     deployment of its own when several models are served)
    messages.py      typed messages between the front end and a model server
    frontend.py      the HTTP routes (OpenAI completions and chat, tokenizer routes, /generate,
                     /v1/models, /health) over Remote (handle) or Local (same replica) models
    openai.py        OpenAI response and stream-chunk shapes
    chat.py          chat templates (Jinja2) for /v1/chat/completions
    app.py           the deployments (ModelIngress for one model, Ingress + LLMServer for
                     several), AppArgs, build_app
    schemas.py       request bodies with bounds, OpenAI-style error bodies
    loading.py       checkpoint / run dir / sweep resolution
    metrics.py       Prometheus metrics through Ray

Importing the package does nothing (no Ray): import the modules you need.
"""
