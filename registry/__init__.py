"""ckreg registry: REST service, services, storage and data model for checkpoints."""
