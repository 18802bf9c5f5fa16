"""Chat templates: a checkpoint's Jinja2 `chat_template` rendered as transformers' `apply_chat_template`
renders it (transformers 5.x, `utils/chat_template_utils.py`), without importing transformers.

The same environment: a sandbox (`ImmutableSandboxedEnvironment`) with `trim_blocks` and `lstrip_blocks`,
the loop-controls extension and a `{% generation %}` block (transformers marks assistant text with it; it
renders its body), a `tojson` filter that does not escape HTML, and the globals `raise_exception`,
`strftime_now`, `dict` and a `namespace` that refuses underscore names. The same inputs: message keys
whose value is None dropped, a message's reasoning under `reasoning_content` (and `thinking`) whichever of
the three names it came as, plain JSON data only, and the tokenizer's named special tokens (bos_token,
eos_token, ...) beside `messages`, `tools`, `documents` and `add_generation_prompt`.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
from collections.abc import Mapping
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils
import numpy as np

from ..errors import UserError

# The names transformers passes a template as special tokens (its SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Names a message's reasoning may come under; templates read the first (gpt-oss ones the second).
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: transformers tracks assistant spans with it; rendering
    text only, the block is its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _body(caller: Any) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """Jinja's namespace() without underscore attributes (no reach into CPython internals)."""

    def __init__(*args: Any, **kwargs: Any):  # noqa: N805 (Jinja's own signature trick: `self` may be a key)
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r}: underscore names are not allowed")


class _DictMaker:
    """`dict(...)` and `dict.fromkeys(...)` for templates, and nothing else of the dict type."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """The template compiled in transformers' environment (cached: a chat renders it every turn)."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, dict=_DictMaker(), namespace=_Namespace,
                       strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
    return env.from_string(source)


def plain(value: Any) -> Any:
    """Only JSON data reaches a template: subclasses of str/int/float (enums, numpy scalars) become the
    base type, mappings dicts, lists and tuples stay, dataclasses and pydantic models become dicts, and
    anything else a placeholder naming its type ("<ndarray>"), so no object's methods are reachable."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base, convert in ((str, str.__str__), (int, int.__int__), (float, float.__float__)):
        if isinstance(value, base):
            return convert(value)  # the base type's own conversion (an enum's __str__ is not it)
    if isinstance(value, Mapping):
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain(v) for v in value)
    if isinstance(value, np.generic):
        return plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _message(message: dict[str, Any]) -> dict[str, Any]:
    """A message as transformers hands it to the template: None values dropped, reasoning aliased."""
    message = {k: v for k, v in message.items() if v is not None}
    reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return plain(message)


def render(source: str, messages: list[dict[str, Any]], *, add_generation_prompt: bool,
           special_tokens: dict[str, str], where: str = "chat template") -> str:
    """The prompt text for `messages` (each a dict with 'role' and 'content'). A template error, or one
    the template raises about the messages, is a one-line UserError."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise UserError("messages: expected a non-empty list of {'role', 'content'} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise UserError(f"messages[{i}]: expected an object with 'role' and 'content', got "
                            f"{type(message).__name__}")
    try:
        template = compile_template(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise UserError(f"{where}: Jinja syntax error on line {e.lineno}: {e.message}") from None
    try:
        return template.render(messages=[_message(m) for m in messages], tools=None, documents=None,
                               add_generation_prompt=add_generation_prompt, **special_tokens)
    except jinja2.exceptions.TemplateError as e:
        raise UserError(f"{where}: {e.message or type(e).__name__}") from None
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        raise UserError(f"{where}: cannot render these messages ({type(e).__name__}: {e})") from None
