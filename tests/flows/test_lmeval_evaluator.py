"""The ``lm_eval`` evaluator: lm-evaluation-harness tasks on a merged tiny Llama, offline.

A Llama (1 layer, width 32) and a word-level tokenizer are built in code; the task is a local
YAML with a 6-line jsonl file (``dataset_path: json``); nothing touches the hub.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lm_eval  # noqa: F401 - a dev dependency: missing is an error, not a skip
import pytest
import torch

from flows.evaluators_lmeval import CONFIG_NAME, LMEvalEvaluator, flatten_results, load_config
from tests.flows.fixtures_flows import *  # noqa: F403
from tests.flows.fixtures_flows import Embedded

WORDS = ["<unk>", "<s>", "</s>", "<pad>", "Q:", "A:", *"abcdefgh"]
ROWS = [{"q": f"{a} {b}", "choices": ["c", "d", "e"], "gold": i % 3} for i, (a, b) in
        enumerate(zip("abcdef", "bcdefg", strict=True))]  # fmt: skip
TASK_YAML = """\
task: tiny_pick
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{{{q}}}} A:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def tiny_llama(seed: int) -> dict[str, torch.Tensor]:
    """A 1-layer Llama's weights as ``save_pretrained`` keeps them (tied head left out)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(_config())
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}


def _config() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )


def write_model_dir(folder: Path) -> Path:
    """config.json and a word-level fast tokenizer: what the evaluator builds models from."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    folder.mkdir(parents=True, exist_ok=True)
    _config().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_tasks(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "tiny_pick.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    (folder / "tiny_pick.yaml").write_text(TASK_YAML.format(data=data))
    return folder


def write_config(home: Path, tmp: Path, **extra: Any) -> Path:
    path = home / CONFIG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {
        "model_dir": str(write_model_dir(tmp / "arch")),
        "include_path": str(write_tasks(tmp / "tasks")),
        "tasks": ["tiny_pick"],
        "batch_size": 4,
        **extra,
    }
    path.write_text(json.dumps(body))
    return path


def test_merge_scored_by_lm_eval_lands_in_registry_metrics(embedded: Embedded) -> None:
    settings = embedded.env.settings
    config = load_config(write_config(settings.home, embedded.env.tmp))
    api = embedded.client
    base = embedded.upload("llama-base", tiny_llama(0), kind="base")
    ft_a = embedded.upload("llama-a", tiny_llama(1), base_id=base["id"], task="a")
    ft_b = embedded.upload("llama-b", tiny_llama(2), base_id=base["id"], task="b")
    started = embedded.post_merge(
        "task_arithmetic", [ft_a["id"], ft_b["id"]], base_id=base["id"], evaluator="lm_eval"
    )
    assert started.status_code == 202, started.text
    assert embedded.launcher.wait_idle(120), embedded.launcher.errors
    run = api.get(f"/api/v1/merges/{started.json()['id']}").json()
    assert run["status"] == "succeeded", run["error"]

    output_id = run["output_checkpoint_id"]
    stored = api.get(f"/api/v1/checkpoints/{output_id}/metrics").json()
    values = {m["name"]: m["value"] for m in stored if m["source"] == "evaluation"}
    assert set(values) == {"lm_eval/tiny_pick/acc", "lm_eval/avg"}
    assert {m["dataset"] for m in stored if m["source"] == "evaluation"} == {"lm_eval"}
    # The stored value is what the harness gives for the merged weights (scored again here).
    from safetensors.torch import load

    files = [f["name"] for f in api.get(f"/api/v1/checkpoints/{output_id}").json()["files"]]
    state: dict[str, torch.Tensor] = {}
    for name in (n for n in files if n.endswith(".safetensors")):
        got = api.get(f"/api/v1/checkpoints/{output_id}/files/{name}")
        assert got.status_code == 200, got.text
        state |= load(got.content)
    again = LMEvalEvaluator(config).evaluate(state)
    assert values["lm_eval/tiny_pick/acc"] == pytest.approx(again["lm_eval/tiny_pick/acc"])
    assert values["lm_eval/tiny_pick/acc"] in {k / len(ROWS) for k in range(len(ROWS) + 1)}


def test_unknown_task_names_the_available_ones(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path / "home", tmp_path, tasks=["tiny_pikc"]))
    with pytest.raises(KeyError, match=r"tiny_pikc.*available: tiny_pick"):
        LMEvalEvaluator(config).evaluate(tiny_llama(0))


def test_config_errors_name_the_file_and_field(tmp_path: Path) -> None:
    missing = tmp_path / "home" / CONFIG_NAME
    with pytest.raises(FileNotFoundError, match=r"lm_eval\.yaml"):
        load_config(missing)
    path = write_config(tmp_path / "home", tmp_path, limt=3)
    with pytest.raises(ValueError, match="limt"):
        load_config(path)


def test_flatten_keeps_filters_and_drops_stderr() -> None:
    results = {
        "gen": {"alias": "gen", "exact_match,strict": 0.5, "exact_match_stderr,strict": 0.1},
        "pick": {"acc,none": 0.25, "acc_norm,none": 0.75},
    }
    assert flatten_results(results, ["gen", "pick"]) == {
        "lm_eval/gen/exact_match/strict": 0.5,
        "lm_eval/pick/acc": 0.25,
        "lm_eval/pick/acc_norm": 0.75,
        "lm_eval/avg": 0.375,
    }
