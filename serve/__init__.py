"""The Ray Serve application: KV-cached generation over HTTP with continuous batching.

    engine.py        Engine: step() = schedule -> run -> postprocess (pure PyTorch; jobs/sample.py
                     and the sweep's decode measurement use it too)
    scheduler.py     admission and KV-cache rows (running requests are rows 0..n-1)
    model_runner.py  prefill / decode passes on the KV cache
    sampler.py       each row's next token with its own parameters and generator
    detokenizer.py   incremental text with stop strings (partial matches held back)
    sequence.py      one request inside the engine
    driver.py        EngineDriver: runs an engine from asyncio (the replica's event loop)
    server.py        LLMServer: one checkpoint per deployment, loaded inside the replica
    messages.py      typed messages between the ingress and LLMServer
    app.py           FastAPI ingress (/generate, /v1/completions, /v1/models, /health), build_app
    schemas.py       request bodies with bounds, OpenAI-style error bodies
    loading.py       checkpoint / run dir / sweep resolution
    metrics.py       Prometheus metrics through Ray

Importing the package does nothing (no Ray): import the modules you need.
"""
