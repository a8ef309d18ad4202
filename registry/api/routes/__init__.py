"""One ``APIRouter`` per resource; ``registry.api.app`` mounts them under ``/api/v1``."""
