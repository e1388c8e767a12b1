"""The tokenizer of a Hugging Face directory, its chat template, and incremental detokenization."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # older tokenizer_config.json: {"content": "<s>", ...}
        return value.get("content")
    return value


class Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` with the bits tokenizer_config.json adds."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not (path / "tokenizer.json").exists():
            raise ValueError(f"model: {path} has no tokenizer.json")
        self.hf = HFTokenizer.from_file(str(path / "tokenizer.json"))
        tc_path = path / "tokenizer_config.json"
        tc = json.loads(tc_path.read_text()) if tc_path.exists() else {}
        self.bos_token = _token_text(tc.get("bos_token"))
        self.eos_token = _token_text(tc.get("eos_token"))
        template = tc.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default", next(iter(named.values()), None))
        jinja_file = path / "chat_template.jinja"
        if jinja_file.exists():
            template = jinja_file.read_text()
        self.chat_template: str | None = template
        self._compiled = None
        self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)
        self.special_ids = {
            i for i, t in self.hf.get_added_tokens_decoder().items() if t.special
        }

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self.hf.token_to_id(self.eos_token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str:
        return self.hf.decode([token_id], skip_special_tokens=False)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any
    ) -> str:
        if not self.chat_template:
            raise ValueError("messages: this model has no chat template")
        if self._compiled is None:
            env = ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
            )
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            env.filters["tojson"] = lambda v, indent=None: json.dumps(v, indent=indent)
            self._compiled = env.from_string(self.chat_template)
        try:
            return self._compiled.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                **extra,
            )
        except jinja2.TemplateError as e:
            raise ValueError(f"messages: the chat template rejected them: {e}") from e


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, holding back incomplete characters.

    Decodes a short window (a few tokens before the last emitted one, starting with the prompt's
    tail) so a token's leading space and multi-byte characters come out as in a full decode.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]) -> None:
        self.tok = tokenizer
        self.ids = list(prompt_ids[-6:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def add(self, token_ids: list[int]) -> str:
        self.ids.extend(token_ids)
        prefix = self.tok.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.tok.decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        """At the end of a request: whatever is pending, replacement characters included."""
        prefix = self.tok.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.tok.decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix) :] if full.startswith(prefix) else ""
