"""The client's upload path (header checks, layouts, transport) imports without torch: a
training job's uploader or `ckreg push` should not pay torch's start-up for a header check."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import json, sys
import registry.client.transport, registry.client.layouts, registry.safetensors_check as sc
light = "torch" not in sys.modules
sizes_ok = sc.DTYPE_SIZES["BF16"] == 2 and "F32" in sc.FLOAT_DTYPE_NAMES
table = sc.TORCH_DTYPES  # built on first use
print(json.dumps({"light": light, "sizes_ok": sizes_ok, "bf16": str(table["BF16"]),
                  "loaded_after": "torch" in sys.modules,
                  "floats": sorted(sc.FLOAT_TORCH_DTYPES)}))
"""


def test_client_imports_without_torch_and_the_table_loads_on_use() -> None:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    report = json.loads(done.stdout)
    assert report["light"] and report["sizes_ok"]
    assert report["bf16"] == "torch.bfloat16" and report["loaded_after"]
    assert report["floats"] == ["BF16", "F16", "F32", "F64", "F8_E4M3", "F8_E5M2"]
