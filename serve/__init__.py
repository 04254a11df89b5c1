"""The Ray Serve application: KV-cached generation over HTTP with continuous batching.

    engine.py    continuous-batching engine (pure PyTorch; jobs/sample.py uses it too)
    runner.py    drives an engine from asyncio (the replica's event loop)
    server.py    LLMServer: one checkpoint per deployment, loaded inside the replica
    app.py       FastAPI ingress (/generate, /v1/completions, /v1/models, /health), build_app
    schemas.py   request bodies with bounds, OpenAI-style error bodies
    loading.py   checkpoint / run dir / sweep resolution, checkpoint loading
    metrics.py   Prometheus metrics through Ray

Importing the package does nothing (no Ray): import the modules you need.
"""
