"""Ray Serve app for BWR-DNC. serve/app.py builds it (AppArgs, build_app, run_app); serve/api.py
assembles the FastAPI routers (serve/routers/, one per surface) around the shared context
(serve/context.py) and auth (serve/auth.py). The Generator deployment (serve/generator.py, its decode
scheduler serve/scheduler.py) runs the model; research endpoints are registered in serve/research.py
and computed in serve/analysis.py. Sessions live in SessionBank shard actors (serve/sessions/) with
a write-ahead log and snapshots (serve/bank_store.py); live events in serve/live.py. Nothing runs at
import time."""
