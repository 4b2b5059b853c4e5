"""A model folder's tokenizer with its chat template, rendered as transformers' apply_chat_template renders it.

ChatTokenizer wraps tokenizer.json (the `tokenizers` library; encode, decode and token_to_id pass through) with what
tokenizer_config.json says about chat: the special tokens (bos_token, eos_token, pad_token, ...) and the chat
templates, compiled as transformers compiles them (sandboxed jinja2, trim_blocks, lstrip_blocks, loop controls,
tojson without HTML escaping, raise_exception, strftime_now, {% generation %} tags). So Qwen2.5's ChatML, Llama 3's
headers and Mistral's [INST] render byte for byte as transformers renders them (tests/test_data.py checks each), with
no transformers at run time. end_of_turn is where an assistant reply ends; pad_id what rows are padded with.
"""
from __future__ import annotations

import functools
import json
import os
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from infra.cli import UserError, read_json

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class _Generation(jinja2.ext.Extension):
    """transformers' {% generation %} ... {% endgeneration %} tags (they mark assistant text): render the body."""
    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return jinja2.nodes.Scope(parser.parse_statements(("name:endgeneration",), drop_needle=True))


def _raise(message):
    raise jinja2.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.cache
def compile_template(source: str) -> jinja2.Template:
    """A chat template compiled as transformers compiles it (utils/chat_template_utils.py): sandboxed jinja2 with
    trim_blocks, lstrip_blocks and loop controls, tojson without HTML escaping, raise_exception and strftime_now."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(source)


class ChatTokenizer:
    """A model folder's tokenizer.json (a tokenizers.Tokenizer: encode, decode, token_to_id, ... pass through) with
    what tokenizer_config.json says about chat: its special tokens (bos_token, eos_token, pad_token, ...) and chat
    templates by name ("default", and "tool_use" if it has one), from chat_template.jinja (which wins, as in
    transformers) or tokenizer_config.json's chat_template (a string or a list of {name, template})."""

    def __init__(self, tokenizer: Tokenizer, templates: dict[str, str], special: dict[str, str], source: str):
        self.tokenizer, self.templates, self.special, self.source = tokenizer, templates, special, source

    def __getattr__(self, name):  # the rest is the tokenizers.Tokenizer's (a copy or unpickling has no tokenizer yet)
        if name == "tokenizer" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.tokenizer, name)

    def render(self, messages: list[dict], add_generation_prompt: bool = False, tools: list | None = None,
               **kwargs) -> str:
        """The text transformers' apply_chat_template(messages, tools, add_generation_prompt, tokenize=False, **kwargs)
        gives: keys whose value is None dropped, reasoning under both reasoning_content and thinking, the special
        tokens as variables. A template's raise_exception is a jinja2.TemplateError."""
        name = "tool_use" if tools is not None and "tool_use" in self.templates else "default"
        if name not in self.templates:
            raise UserError(f"{self.source}: no chat template (tokenizer_config.json chat_template or "
                            "chat_template.jinja); conversational rows need one (standard rows are raw text)")
        msgs = []
        for m in messages:
            m = {k: v for k, v in m.items() if v is not None}
            r = next((m[k] for k in ("reasoning_content", "thinking", "reasoning") if k in m), None)
            msgs.append(m if r is None else {"thinking": r, **m, "reasoning_content": r})
        return compile_template(self.templates[name]).render(
            messages=msgs, tools=tools, documents=None, add_generation_prompt=add_generation_prompt,
            **{**self.special, **kwargs})

    def id(self, token: str | None) -> int | None:
        return None if token is None else self.tokenizer.token_to_id(token)

    @functools.cached_property
    def end_of_turn(self) -> tuple[int, ...]:
        """The ids that end an assistant reply: the eos_token's and the template's end of turn, i.e. the first
        special token after the reply in a rendered exchange (<|im_end|>, <|eot_id|>, </s>, <end_of_turn>)."""
        ask, reply = [{"role": "user", "content": "Hi"}], {"role": "assistant", "content": "Hello there"}
        prompt = full = ""
        try:
            if "default" in self.templates:
                prompt, full = self.render(ask, True), self.render(ask + [reply])
        except jinja2.TemplateError:  # a template that wants more than a plain exchange: the eos_token only
            pass
        suffix = full[len(os.path.commonprefix([prompt, full])):].rpartition(reply["content"])[2]
        special = {i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special}
        eot = next((i for i in self.tokenizer.encode(suffix, add_special_tokens=False).ids if i in special), None)
        ids = [self.id(self.special.get("eos_token")), eot]
        return tuple(dict.fromkeys(i for i in ids if i is not None))

    @property
    def pad_id(self) -> int:
        """The id rows are padded with (masked, so any id works): pad_token's, else eos_token's, else 0."""
        return next((i for i in (self.id(self.special.get(k)) for k in ("pad_token", "eos_token")) if i is not None), 0)


def load_tokenizer(model_dir) -> ChatTokenizer:
    """The model folder's tokenizer.json, special tokens and chat templates (ChatTokenizer); a template that does not
    compile is a UserError naming its file."""
    folder = Path(model_dir)
    if not (folder / "tokenizer.json").is_file():
        raise UserError(f"{folder / 'tokenizer.json'}: not found; the model folder must ship tokenizer.json")
    config_file, jinja_file = folder / "tokenizer_config.json", folder / "chat_template.jinja"
    config = read_json(config_file) if config_file.is_file() else {}
    templates = config.get("chat_template") or {}
    templates = {"default": templates} if isinstance(templates, str) else {t["name"]: t["template"] for t in templates}
    if jinja_file.is_file():
        templates, config_file = {"default": jinja_file.read_text()}, jinja_file
    special = {k: v["content"] if isinstance(v, dict) else v for k, v in config.items() if k in SPECIAL_TOKENS and v}
    for source in templates.values():
        try:
            compile_template(source)
        except jinja2.TemplateSyntaxError as e:
            raise UserError(f"{config_file}: the chat template does not compile (line {e.lineno}: {e.message})"
                            ) from None
    return ChatTokenizer(Tokenizer.from_file(str(folder / "tokenizer.json")), templates, special, str(folder))
