"""The registry's HTTP layer: FastAPI app, dependencies, routes, error mapping."""
