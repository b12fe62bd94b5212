"""A GGUF checkpoint's tokenizer for the `tidal chat` / `generate` start-up, without importing transformers.

Owns: `LightTokenizer`: encode, decode and apply_chat_template over the `tokenizers` library and jinja2,
reading the tokenizer directory that gguf_file.py writes (tokenizer.json, tokenizer_config.json,
chat_template.jinja), with the same results as transformers' tokenizer loaded from that directory
(tests/test_light_config.py compares them). Anything else, and any apply_chat_template call outside the
plain case (tools, documents, continue_final_message, padding, tensors, ...), goes to that transformers
tokenizer, loaded on first use (`hf_tokenizer`).
Must not: be handed to code that needs a real transformers tokenizer object (`isinstance` checks, e.g.
xgrammar's TokenizerInfo.from_huggingface): only loader.Checkpoint.load_tokenizer returns one, and only
when `use_light_tokenizer(True)` was called (the chat / generate commands, which never constrain output).

Why: importing transformers for its tokenizer is about 1.5 s of a warm `tidal chat` start-up on a 2-core
CPU; `tokenizers` and jinja2 load in about 0.1 s.
"""
from __future__ import annotations

import json
import os
import re
import threading
from datetime import datetime

_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")
# transformers' `{% generation %}` extension (assistant masks) is not built here: such templates go to it
_GENERATION_TAG = re.compile(r"\{\%-?\s*generation\s*-?\%\}")
# apply_chat_template arguments handled here when left at these values; any other value goes to transformers
_PLAIN_ARGS = {"tools": None, "documents": None, "chat_template": None, "continue_final_message": False,
               "sanitize_control_tokens": False, "padding": False, "truncation": False, "max_length": None,
               "return_tensors": None, "return_assistant_tokens_mask": False, "tokenizer_kwargs": None}


class LightTokenizer:
    is_light = True  # not a transformers tokenizer: `hf_tokenizer` is

    def __init__(self, tokenizer_dir: str):
        from tokenizers import Tokenizer

        self.tokenizer_dir = tokenizer_dir
        self._tok = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))
        with open(os.path.join(tokenizer_dir, "tokenizer_config.json")) as f:
            cfg = json.load(f)
        template_file = os.path.join(tokenizer_dir, "chat_template.jinja")
        if os.path.isfile(template_file):
            with open(template_file) as f:
                self.chat_template = f.read()
        else:
            self.chat_template = cfg.get("chat_template")
        self.special_tokens_map = {}
        for name in _SPECIAL:
            value = cfg.get(name)
            value = value.get("content") if isinstance(value, dict) else value
            setattr(self, name, value)
            if value is not None:
                self.special_tokens_map[name] = value
        self.clean_up_tokenization_spaces = bool(cfg.get("clean_up_tokenization_spaces", False))
        self._template = None  # compiled on first use
        self._hf = None
        self._hf_lock = threading.Lock()

    # ---- what the chat / generate path uses --------------------------------------------------------------
    def _id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    bos_token_id = property(lambda self: self._id(self.bos_token))
    eos_token_id = property(lambda self: self._id(self.eos_token))
    unk_token_id = property(lambda self: self._id(self.unk_token))
    pad_token_id = property(lambda self: self._id(self.pad_token))

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True, **kwargs) -> list[int]:
        if kwargs:
            return self.hf_tokenizer.encode(text, add_special_tokens=add_special_tokens, **kwargs)
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None,
               **kwargs) -> str:
        clean = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        # transformers ignores the clean-up for BPE vocabularies (it would corrupt them); other cases go to it
        if kwargs or (clean and type(self._tok.model).__name__ != "BPE"):
            return self.hf_tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens,
                                            clean_up_tokenization_spaces=clean_up_tokenization_spaces, **kwargs)
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        return self._tok.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, conversation, add_generation_prompt: bool = False, tokenize: bool = True,
                            return_dict: bool = True, **kwargs):
        """transformers' apply_chat_template for a plain conversation (one list of message dicts of JSON
        values, template variables as JSON values); everything else is transformers' own call."""
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in _PLAIN_ARGS}
        plain = (all(options[k] == _PLAIN_ARGS[k] for k in options) and self.chat_template is not None
                 and isinstance(self.chat_template, str) and not _GENERATION_TAG.search(self.chat_template)
                 and isinstance(conversation, list) and conversation
                 and all(type(m) is dict for m in conversation) and _is_json(conversation) and _is_json(kwargs))
        if not plain:
            return self.hf_tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                                         tokenize=tokenize, return_dict=return_dict,
                                                         **options, **kwargs)
        # as transformers: drop None values, alias the reasoning fields, special tokens as template variables
        messages = [_alias_reasoning({k: v for k, v in m.items() if v is not None}) for m in json_copy(conversation)]
        text = self._compiled().render(messages=messages, tools=None, documents=None,
                                       add_generation_prompt=add_generation_prompt,
                                       **{**self.special_tokens_map, **json_copy(kwargs)})
        if not tokenize:
            return text
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return {"input_ids": ids, "attention_mask": [1] * len(ids)} if return_dict else ids

    def _compiled(self):
        if self._template is None:
            self._template = _compile(self.chat_template)
        return self._template

    # ---- everything else: transformers' tokenizer for the same directory --------------------------------
    @property
    def hf_tokenizer(self):
        """transformers' tokenizer for the same directory (imports transformers on first use)."""
        with self._hf_lock:
            if self._hf is None:
                from transformers import AutoTokenizer

                self._hf = AutoTokenizer.from_pretrained(self.tokenizer_dir)
            return self._hf

    def __getattr__(self, name: str):
        # only called for what this class lacks; never for dunders (copy, pickle probe them) or our own state
        if name.startswith("__") or name in ("_tok", "_hf", "_hf_lock", "_template"):
            raise AttributeError(name)
        return getattr(self.hf_tokenizer, name)

    def __reduce__(self):
        # copy / deepcopy / pickle: a fresh tokenizer of the same directory (the server copies its tokenizer
        # for a second worker thread; tokenizers' own objects are not shared between threads)
        return (type(self), (self.tokenizer_dir,))

    def __repr__(self) -> str:
        return f"LightTokenizer({self.tokenizer_dir!r}, vocab={len(self)})"


def _is_json(value) -> bool:
    """Only exact JSON types (transformers rebuilds anything else through its own converter)."""
    if value is None or type(value) in (str, int, float, bool):
        return True
    if type(value) is dict:
        return all(type(k) is str and _is_json(v) for k, v in value.items())
    if type(value) is list:
        return all(_is_json(v) for v in value)
    return False


def json_copy(value):
    if type(value) is dict:
        return {k: json_copy(v) for k, v in value.items()}
    if type(value) is list:
        return [json_copy(v) for v in value]
    return value


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # transformers' chat_template_utils


def _alias_reasoning(message: dict) -> dict:
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


def _compile(chat_template: str):
    """The template, compiled in the sandboxed environment transformers builds (utils/chat_template_utils.py:
    trim_blocks, lstrip_blocks, loopcontrols; its tojson, raise_exception, strftime_now, dict and namespace)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}.")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env.from_string(chat_template)
