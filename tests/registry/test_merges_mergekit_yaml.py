"""``POST /merges`` with a mergekit YAML: references resolved to ``ckreg/<id>`` (ids, names:
newest ready), the config stored and covered by the idempotency key, and every bad YAML a 422 in
the documented error shape naming the key (SQLite and PostgreSQL)."""

from __future__ import annotations

from typing import Any

import pytest
from sqlmodel import select

from registry.models import MergeRun
from tests.registry.registry_fixtures import *  # noqa: F403
from tests.registry.registry_fixtures import Api, st_bytes, tiny_state


def _ready(api: Api, name: str, seed: int, **fields: Any) -> int:
    data = st_bytes(tiny_state(seed=seed))
    return int(api.register({"model.safetensors": data}, name=name, **fields)["id"])


@pytest.fixture
def zoo(api: Api) -> dict[str, int]:
    base = _ready(api, "base", 0, kind="base")
    ft_old = _ready(api, "ft", 1, kind="finetune", base_id=base)
    ft_new = _ready(api, "ft", 2, kind="finetune", base_id=base)
    other = _ready(api, "other", 3, kind="finetune", base_id=base)
    return {"base": base, "ft_old": ft_old, "ft": ft_new, "other": other}


def _post(api: Api, body: dict[str, Any]) -> Any:
    return api.client.post("/api/v1/merges", json=body, headers=api.headers)


def _error(response: Any, *words: str) -> None:
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert {"error", "message"} <= detail.keys(), detail
    for word in words:
        assert word in detail["message"], (word, detail["message"])


TIES = """
merge_method: ties
base_model: ckreg/base
models:
  - model: ckreg/ft
    parameters: {{weight: 0.5, density: [1, 0.5]}}
  - model: {other}
    parameters: {{weight: 0.5}}
parameters: {{normalize: true}}
dtype: float32
"""


def test_yaml_by_names_and_ids_is_resolved_stored_and_idempotent(
    api: Api, zoo: dict[str, int]
) -> None:
    text = TIES.format(other=zoo["other"])
    created = _post(api, {"mergekit": text})
    assert created.status_code == 202, created.text
    run = created.json()
    config = run["mergekit_config"]
    # "ckreg/ft" is the newest ready checkpoint named ft; an id stays that id
    assert [m["model"] for m in config["models"]] == [f"ckreg/{zoo['ft']}", f"ckreg/{zoo['other']}"]
    assert config["base_model"] == f"ckreg/{zoo['base']}"
    assert config["models"][0]["parameters"]["density"] == [1, 0.5]
    assert run["method"] == "ties" and run["base_id"] == zoo["base"]
    assert [i["checkpoint_id"] for i in run["inputs"]] == [zoo["ft"], zoo["other"]]
    assert api.env.launcher.merges == [run["id"]]
    # the same config by ids (or as a mapping) is the same run
    by_ids = text.replace("ckreg/ft", f"ckreg/{zoo['ft']}").replace("ckreg/base", str(zoo["base"]))
    again = _post(api, {"mergekit": by_ids})
    assert again.status_code == 200 and again.json()["id"] == run["id"], again.text
    mapping = _post(api, {"mergekit": config})
    assert mapping.status_code == 200 and mapping.json()["reused"]
    # another parameter is another run
    other = _post(api, {"mergekit": text.replace("weight: 0.5,", "weight: 0.4,", 1)})
    assert other.status_code == 202 and other.json()["id"] != run["id"]
    shown = api.client.get(f"/api/v1/merges/{run['id']}", headers=api.headers).json()
    assert shown["mergekit_config"] == config


BAD_YAML = [
    (lambda t: t.replace("ckreg/ft", "ckreg/nope"), ["models[0].model", "'nope'"]),
    (lambda t: t.replace("ckreg/base", "ckreg/99999"), ["base_model", "99999"]),
    (lambda t: t.replace("merge_method: ties", "merge_method: tiez"), ["tiez"]),
    (lambda t: t.replace("dtype: float32", "dtyp: float32"), ["dtyp", "unknown key"]),
    (lambda t: t.replace("normalize: true", "normalise: true"), ["parameters.normalise"]),
    (lambda t: t.replace("{weight: 0.5}", "{wieght: 0.5}"), ["models[1].parameters.wieght"]),
    (lambda t: t + "state: /etc\n", ["state", "not accepted"]),
    (lambda t: t + "objective: os:system\n", ["objective", "not accepted"]),
    (lambda t: t.replace("models:", "models: [\n"), ["not valid YAML"]),
    (lambda t: "- just a list\n", ["mapping"]),
    (lambda t: t.replace("ckreg/ft", "/etc/passwd"), ["models[0].model", "/etc/passwd"]),
    (lambda t: t.replace("ckreg/ft", '"ft\\0"'), ["models[0].model", "control character"]),
    (lambda t: "a: &x [1, 1]\nb: [*x, *x]\n" + t, ["aliases"]),
    # values of the wrong type, in a scalar, a gradient point or a filter's value
    (
        lambda t: t.replace("{weight: 0.5}", "{weight: heavy}"),
        ["models[1].parameters.weight", "'heavy'"],
    ),
    (
        lambda t: t.replace("density: [1, 0.5]", "density: [1, half]"),
        ["models[0].parameters.density", "'half'"],
    ),
    (
        lambda t: t.replace("normalize: true", "normalize: [{filter: mlp, value: maybe}]"),
        ["parameters.normalize", "'maybe'"],
    ),
]


def test_bad_yaml_is_a_422_naming_the_key(api: Api, zoo: dict[str, int]) -> None:
    for edit, words in BAD_YAML:
        _error(_post(api, {"mergekit": edit(TIES.format(other=zoo["other"]))}), *words)
    with api.env.session() as session:
        assert session.exec(select(MergeRun)).all() == []
    assert api.env.launcher.merges == []


def test_mergekit_and_json_fields_together_or_neither_are_422(
    api: Api, zoo: dict[str, int]
) -> None:
    text = TIES.format(other=zoo["other"])
    both = {"mergekit": text, "method": "ties", "inputs": [{"checkpoint_id": zoo["ft"]}]}
    _error(_post(api, both), "either 'mergekit'")
    _error(_post(api, {"evaluator": None}), "'method' is required")
    _error(_post(api, {"method": "linear"}), "'inputs'")


def test_a_slices_config_records_every_source_as_input(api: Api, zoo: dict[str, int]) -> None:
    text = f"""
merge_method: slerp
base_model: {zoo["base"]}
slices:
  - sources:
      - {{model: ckreg/{zoo["base"]}, layer_range: [0, 1]}}
      - {{model: ckreg/other, layer_range: [0, 1]}}
parameters:
  t: [{{filter: self_attn, value: [0, 1]}}, {{value: 0.5}}]
"""
    created = _post(api, {"mergekit": text})
    assert created.status_code == 202, created.text
    run = created.json()
    assert [i["checkpoint_id"] for i in run["inputs"]] == [zoo["other"]]
    sources = run["mergekit_config"]["slices"][0]["sources"]
    assert [s["model"] for s in sources] == [f"ckreg/{zoo['base']}", f"ckreg/{zoo['other']}"]


TEMPLATE = """
merge_method: ties
parameters: {density: [1, 0.5], weight: 0.5}
dtype: float32
"""


def _policy(api: Api, **fields: Any) -> Any:
    body = {"name": "kit", "trigger": "manual", **fields}
    return api.client.post("/api/v1/policies", json=body, headers=api.headers)


def test_a_policy_template_takes_the_selectors_matches(api: Api, zoo: dict[str, int]) -> None:
    selector = {"base_id": zoo["base"], "window": "all_since_last_fold"}
    created = _policy(api, mergekit=TEMPLATE, selector=selector)
    assert created.status_code == 201, created.text
    policy = created.json()
    assert policy["method"] == "ties" and policy["mergekit"] == TEMPLATE
    ran = api.client.post(f"/api/v1/policies/{policy['id']}/run", headers=api.headers)
    assert ran.status_code in (200, 202), ran.text
    run = ran.json()
    config = run["mergekit_config"]
    assert config["base_model"] == f"ckreg/{zoo['base']}"
    chosen = [i["checkpoint_id"] for i in run["inputs"]]
    assert chosen == [zoo["ft_old"], zoo["ft"], zoo["other"]]
    assert [m["model"] for m in config["models"]] == [f"ckreg/{i}" for i in chosen]
    assert config["parameters"] == {"density": [1, 0.5], "weight": 0.5}
    assert run["policy_id"] == policy["id"] and api.env.launcher.merges == [run["id"]]


BAD_TEMPLATES = [
    ({"mergekit": TEMPLATE.replace("density", "densty")}, ["parameters.densty"]),
    ({"mergekit": TEMPLATE + "models: [ckreg/nope, ckreg/ft]\n"}, ["models[0].model"]),
    ({"mergekit": TEMPLATE + "state: /tmp/x\n"}, ["state", "not accepted"]),
    ({"mergekit": TEMPLATE, "params": {"density": 0.3}}, ["'params'"]),
    ({"mergekit": TEMPLATE, "method": "linear"}, ["'linear'", "merge_method 'ties'"]),
    ({"mergekit": "merge_method: [\n"}, ["not valid YAML"]),
]


def test_a_bad_policy_template_is_a_422(api: Api, zoo: dict[str, int]) -> None:
    for fields, words in BAD_TEMPLATES:
        _error(_policy(api, selector={"base_id": zoo["base"]}, **fields), *words)
    listed = api.client.get("/api/v1/policies", headers=api.headers).json()
    assert listed == [] or listed.get("items", listed) == []


def test_a_lora_reference_names_both_checkpoints(api: Api, zoo: dict[str, int]) -> None:
    text = TIES.format(other=zoo["other"]).replace("ckreg/ft", "ckreg/ft+ckreg/base")
    run = _post(api, {"mergekit": text}).json()
    assert run["mergekit_config"]["models"][0]["model"] == f"ckreg/{zoo['ft']}+ckreg/{zoo['base']}"
    assert [i["checkpoint_id"] for i in run["inputs"]] == [zoo["ft"], zoo["other"]]
    _error(_post(api, {"mergekit": text.replace("+ckreg/base", "+ckreg/x+ckreg/y")}), "'+lora'")
