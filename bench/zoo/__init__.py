"""The merge-quality model zoo: seeded fine-tunes of one MLP on scikit-learn's 8x8 digits.

- ``build_zoo(out_dir, seed=0, tasks=DEFAULT_TASKS)`` / ``python -m bench.zoo.build --out DIR``
  writes base, task models, Adam second moments, Fishers, trajectories, irrelevant models and
  ``manifest.json``;
- ``DigitsEvaluator(zoo_dir, split=...)`` scores merged backbones (``ckreg.evaluators: digits``);
- ``python -m bench.zoo.quality --zoo DIR`` merges every method in memory and prints the table.
"""

from bench.zoo.build import build_zoo, ensure_zoo
from bench.zoo.data import DEFAULT_TASKS, TASKS
from bench.zoo.evaluator import DigitsEvaluator, DigitsObjective
from bench.zoo.manifest import ZooManifest, load_manifest
from bench.zoo.train import TrainConfig

__all__ = [
    "DEFAULT_TASKS",
    "TASKS",
    "DigitsEvaluator",
    "DigitsObjective",
    "TrainConfig",
    "ZooManifest",
    "build_zoo",
    "ensure_zoo",
    "load_manifest",
]
