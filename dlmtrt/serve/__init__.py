"""OpenAI-compatible HTTP serving (FastAPI + uvicorn) with step-granular batching of diffusion generations.

`app.py`: the endpoints and request validation; `scheduler.py`: cohorts of compatible requests advanced one
`DecodeSession.step()` at a time by one worker thread; `protocol.py`: request bodies and errors;
`metrics.py`: Prometheus metrics; `server.py`: uvicorn with a graceful shutdown.
"""
