"""``chat_template``: a bundled name, ``auto`` (the inputs' most common template) or literal Jinja.

The bundled templates are ckreg's own. ``chatml``, ``llama3`` and ``mistral`` render the same
text as mergekit 0.1.5's for any conversation; ``alpaca`` and ``exaone`` render the clean
published formats, where mergekit's files leave stray indentation (exaone) or drop the blank
line before a generation prompt (alpaca).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

LOG = logging.getLogger(__name__)

BUNDLED: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{% for message in messages %}"
        "{% if loop.first %}{{ bos_token }}{% endif %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
        "{{ message['content'] | trim }}{{ '<|eot_id|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "mistral": (
        "{% if messages[0]['role'] == 'system' %}"
        "{% set system_message = messages[0]['content'] %}{% set turns = messages[1:] %}"
        "{% else %}{% set turns = messages %}{% endif %}"
        "{{ bos_token }}"
        "{% for message in turns %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('after an optional system message, roles must alternate "
        "user/assistant') }}{% endif %}"
        "{% if message['role'] == 'user' %}"
        "{% if loop.first and system_message is defined %}"
        "{{ ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
        "{% else %}{{ ' [INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
        "{% else %}{{ raise_exception('only user and assistant roles after the system "
        "message') }}{% endif %}"
        "{% endfor %}"
    ),
    "alpaca": (
        "{% set system = messages | selectattr('role', 'equalto', 'system') | list %}"
        "{% if system %}{{ (system | last).content | trim }}{% endif %}"
        "{% set ns = namespace(parts=[]) %}"
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}{% set head = '### Instruction:' %}"
        "{% elif message['role'] == 'assistant' %}{% set head = '### Response:' %}"
        "{% elif message['role'] == 'user_context' %}{% set head = '### Input:' %}"
        "{% else %}{% set head = '' %}{% endif %}"
        "{% if head %}{% set ns.parts = ns.parts + [head + '\\n' + message['content'] | trim]"
        " %}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}"
        "{% set ns.parts = ns.parts + ['### Response:\\n'] %}{% endif %}"
        "{{ '\\n\\n' + ns.parts | join('\\n\\n') }}"
    ),
    "exaone": (
        "{% for message in messages %}"
        "{% if loop.first and message['role'] != 'system' %}"
        "{{ '[|system|][|endofturn|]\\n' }}{% endif %}"
        "{{ '[|' + message['role'] + '|]' + message['content'] }}"
        "{% if message['role'] == 'user' %}{{ '\\n' }}{% else %}{{ '[|endofturn|]\\n' }}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
    ),
}


def resolve_chat_template(value: str | None, model_dirs: Iterable[Path]) -> str | None:
    """The Jinja text for a ``chat_template`` setting (None: leave the tokenizer's own).

    ``auto`` picks the template most input models share (None if none has one); a bundled name
    gives its template; anything else must look like Jinja (contains ``{``, 20+ characters).
    """
    if not value:
        return None
    if value == "auto":
        found = [t.strip() for t in (_model_template(d) for d in model_dirs) if t]
        return Counter(found).most_common(1)[0][0] if found else None
    if value in BUNDLED:
        return BUNDLED[value]
    if len(value) < 20 or "{" not in value:
        raise ValueError(
            f"chat_template {value!r} is neither a bundled name ({', '.join(BUNDLED)}, auto) "
            "nor a Jinja template"
        )
    return value


def _model_template(model_dir: Path) -> str | None:
    """A model folder's chat template: chat_template.jinja, else tokenizer_config.json's."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    config = model_dir / "tokenizer_config.json"
    if not config.is_file():
        return None
    template = json.loads(config.read_text()).get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    elif isinstance(template, dict):
        template = template.get("default")
    return template if isinstance(template, str) else None
