"""An adapter's own chat template: fine-tunes trained on a chat format other than the base model's ship
it in their repository, as ``tokenizer_config.json``'s ``chat_template`` (or ``chat_template.jinja``,
as newer ``transformers`` saves it). The router renders a request for that adapter with it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
CHAT_TEMPLATE_JINJA = "chat_template.jinja"
TEMPLATE_FILES = (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, CHAT_TEMPLATE_JINJA)


@dataclass(frozen=True)
class ChatTemplateFiles:
    """A chat template and the special tokens it may name (None: the adapter's files do not say)."""

    template: str
    bos_token: str | None = None
    eos_token: str | None = None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        # A broken tokenizer file must not make the adapter unusable: its requests get the base template.
        logger.warning("ignoring %s: %s", path, err)
        return {}
    return data if isinstance(data, dict) else {}


def _template_source(value: Any) -> str | None:
    """``chat_template`` as ``tokenizer_config.json`` writes it: a string, or a list of named templates
    (the "default" one, else the first)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = [t for t in value if isinstance(t, dict) and isinstance(t.get("template"), str)]
        chosen = next((t for t in named if t.get("name") == "default"), named[0] if named else None)
        return chosen["template"] if chosen else None
    return None


def _token_text(value: Any) -> str | None:
    """A special token as the tokenizer files write it: a string or ``{"content": ...}``."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def read_chat_template(folder: Path) -> ChatTemplateFiles | None:
    """The chat template among an adapter's files, or None when it has none."""
    config = _read_json(folder / TOKENIZER_CONFIG)
    try:
        source = (folder / CHAT_TEMPLATE_JINJA).read_text(encoding="utf-8")
    except FileNotFoundError:
        source = _template_source(config.get("chat_template"))
    except (OSError, ValueError) as err:
        logger.warning("ignoring %s: %s", folder / CHAT_TEMPLATE_JINJA, err)
        source = _template_source(config.get("chat_template"))
    if not source:
        return None
    special = _read_json(folder / SPECIAL_TOKENS_MAP)

    def token(name: str) -> str | None:
        found = _token_text(config.get(name))
        return found if found is not None else _token_text(special.get(name))

    return ChatTemplateFiles(source, token("bos_token"), token("eos_token"))
