"""`saguaro serve`: an OpenAI-compatible HTTP server (FastAPI on uvicorn) over `saguaro.engine`.

`app.py` the endpoints, `generation.py` one request's answer (streamed or whole), `protocol.py` the
request bodies and errors, `responses.py` the response bodies, `text.py` incremental detokenizing,
`metrics.py` Prometheus, `run.py` uvicorn with a graceful SIGTERM."""
