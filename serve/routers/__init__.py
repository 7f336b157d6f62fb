"""FastAPI routers, one per surface of the API. Each gets the shared :class:`serve.context.ApiContext`
with ``Depends(get_ctx)`` and the caller with ``Depends(caller)``; ``serve.api.create_api`` assembles them."""
