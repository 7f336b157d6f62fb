"""Ray Serve app for BWR-DNC: FastAPI ingress (serve/app.py; routers by surface in serve/routers/, assembled by serve/api.py), the Generator
deployment (serve/generator.py), SessionBank shard actors with durable storage
(serve/session_bank.py, serve/bank_store.py), live events (serve/live.py) and research
computations (serve/research.py). Nothing runs at import time."""
