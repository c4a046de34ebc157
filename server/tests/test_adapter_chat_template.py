"""An adapter's own chat template, as read from the files its repository ships."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorax_server.adapters.chat_template import ChatTemplateFiles, read_chat_template


def _folder(tmp_path: Path, files: dict[str, object]) -> Path:
    for name, content in files.items():
        (tmp_path / name).write_text(content if isinstance(content, str) else json.dumps(content))
    return tmp_path


CASES = {
    "none": ({"tokenizer_config.json": {"bos_token": "<s>"}}, None),
    "no files": ({}, None),
    "string": (
        {"tokenizer_config.json": {"chat_template": "T", "bos_token": "<s>", "eos_token": {"content": "</s>"}}},
        ChatTemplateFiles("T", "<s>", "</s>"),
    ),
    "jinja file wins": (
        {"tokenizer_config.json": {"chat_template": "T", "eos_token": "<|end|>"}, "chat_template.jinja": "J"},
        ChatTemplateFiles("J", None, "<|end|>"),
    ),
    "named default": (
        {
            "tokenizer_config.json": {
                "chat_template": [{"name": "tool_use", "template": "U"}, {"name": "default", "template": "D"}]
            }
        },
        ChatTemplateFiles("D"),
    ),  # fmt: skip
    "named, no default": (
        {"tokenizer_config.json": {"chat_template": [{"name": "rag", "template": "R"}, {"name": "x"}]}},
        ChatTemplateFiles("R"),
    ),
    "tokens from the special tokens map": (
        {
            "tokenizer_config.json": {"chat_template": "T", "bos_token": None},
            "special_tokens_map.json": {"bos_token": {"content": "<b>"}, "eos_token": "<e>"},
        },
        ChatTemplateFiles("T", "<b>", "<e>"),
    ),  # fmt: skip
    "broken config, jinja still read": (
        {"tokenizer_config.json": "{not json", "chat_template.jinja": "J"},
        ChatTemplateFiles("J"),
    ),
    "empty template": ({"tokenizer_config.json": {"chat_template": ""}}, None),
    "not a template": ({"tokenizer_config.json": {"chat_template": 3}}, None),
    "config not an object": ({"tokenizer_config.json": ["chat_template"]}, None),
}


@pytest.mark.parametrize("case", CASES)
def test_read_chat_template(tmp_path: Path, case: str) -> None:
    files, expected = CASES[case]
    assert read_chat_template(_folder(tmp_path, files)) == expected
