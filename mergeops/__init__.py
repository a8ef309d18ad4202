"""mergeops: a streaming model-merge engine (torch + safetensors only)."""
