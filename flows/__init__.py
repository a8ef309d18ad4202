"""ckreg flows: Prefect orchestration of registry services and mergeops."""
