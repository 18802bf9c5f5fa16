"""The OpenAI wire format: request bodies, response and stream-chunk bodies, and how a request becomes
prompt token ids and `SamplingParams`.

Request bodies are pydantic models in strict mode (a string where a number belongs, or a list where a
message's content belongs, is refused rather than coerced); unknown fields are ignored, as OpenAI's own
server does for fields it does not know. Fields OpenAI defines that change the answer's shape and that
this server does not implement (`n`, `logprobs`, `tools`, ...) are refused unless they carry their
default, so a client never silently gets less than it asked for.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..run.generation import SamplingParams
from ..run.tokenizer import Tokenizer
from .errors import bad_request

# Fields accepted only at their default, each with the values that mean "not used".
UNSUPPORTED_UNLESS_DEFAULT: dict[str, tuple[Any, ...]] = {
    "n": (None, 1), "best_of": (None, 1), "echo": (None, False), "suffix": (None, ""),
    "logprobs": (None, False), "top_logprobs": (None, 0), "logit_bias": (None, {}), "tools": (None, []),
}


def _is_default(value: Any, defaults: tuple[Any, ...]) -> bool:
    # `type(...) is` so that True does not pass for 1 nor 0 for False.
    return any(value is d or (type(value) is type(d) and value == d) for d in defaults)


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(Strict):
    include_usage: bool = False


class GenerationRequest(Strict):
    """The fields /v1/completions and /v1/chat/completions share."""

    model: str | None = None  # None: the served model (OpenAI requires it; curl users forget it)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None  # None: OpenAI's default, 1
    top_p: float | None = None
    stop: list[str] = []  # a string or a list of strings on the wire
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Extras outside OpenAI's schema (vLLM's names; the openai client sends them with `extra_body=`).
    top_k: int | None = None  # 0 or -1 (vLLM's spelling): off
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] = []
    # OpenAI fields this server does not implement (see UNSUPPORTED_UNLESS_DEFAULT).
    n: Any = None
    best_of: Any = None
    echo: Any = None
    suffix: Any = None
    logprobs: Any = None
    top_logprobs: Any = None
    logit_bias: Any = None
    tools: Any = None

    # max_tokens when the request gives none (at most what the context leaves): OpenAI's 16 for
    # completions; None: the rest of the context.
    default_max_tokens: ClassVar[int | None] = None
    prompt_field: ClassVar[str]  # the field a too-long prompt is blamed on

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: Any) -> Any:
        if value is None:
            return []
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(s, str) for s in value):
            return value
        raise ValueError("must be a string or a list of strings")

    @field_validator(*UNSUPPORTED_UNLESS_DEFAULT, mode="before")
    @classmethod
    def _only_default(cls, value: Any, info) -> Any:
        defaults = UNSUPPORTED_UNLESS_DEFAULT[info.field_name]
        if not _is_default(value, defaults):
            raise ValueError(f"not supported by this server (leave it out, or give {defaults[-1]!r})")
        return value

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def check_model(self, served: str) -> None:
        if self.model is not None and self.model != served:
            raise bad_request(f"model {self.model!r} is not served here; this server serves {served!r}",
                              param="model", code="model_not_found")

    def sampling(self, *, prompt_tokens: int, max_seq_len: int) -> SamplingParams:
        """SamplingParams for a prompt of `prompt_tokens` in a context of `max_seq_len` (an APIError when
        they do not fit; the values' ranges are checked by `generate`, like every generation's)."""
        room = max_seq_len - prompt_tokens
        if room < 1:
            raise bad_request(f"the prompt is {prompt_tokens} tokens; the model's context is {max_seq_len} "
                              "tokens, leaving no room to generate", param=self.prompt_field,
                              code="context_length_exceeded")
        max_tokens = self.requested_max_tokens() or min(self.default_max_tokens or room, room)
        if max_tokens > room:
            raise bad_request(f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds the "
                              f"model's context of {max_seq_len} tokens", param="max_tokens",
                              code="context_length_exceeded")
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_k=0 if self.top_k in (None, -1) else self.top_k,
            top_p=1.0 if self.top_p is None else self.top_p,
            min_p=self.min_p or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            seed=self.seed, stop=list(self.stop), stop_token_ids=list(self.stop_token_ids))

    def prompt_ids(self, tokenizer: Tokenizer) -> list[int]:
        """The prompt's token ids (not yet checked: `generate` checks them against the model)."""
        raise NotImplementedError


class CompletionRequest(GenerationRequest):
    prompt: str | list[int]  # text, or token ids
    default_max_tokens: ClassVar[int | None] = 16
    prompt_field: ClassVar[str] = "prompt"

    @field_validator("prompt", mode="before")
    @classmethod
    def _text_or_ids(cls, value: Any) -> Any:
        if isinstance(value, str) or (isinstance(value, list) and all(type(i) is int for i in value)):
            return value
        raise ValueError("must be a string or a list of token ids (one prompt per request)")

    def prompt_ids(self, tokenizer: Tokenizer) -> list[int]:
        return tokenizer.encode(self.prompt) if isinstance(self.prompt, str) else list(self.prompt)


class Message(Strict):
    role: Literal["system", "user", "assistant"]
    content: str  # text only: content parts (images, audio) are refused by the strict type


class ChatRequest(GenerationRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # OpenAI's newer name for max_tokens
    prompt_field: ClassVar[str] = "messages"

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def prompt_ids(self, tokenizer: Tokenizer) -> list[int]:
        text = tokenizer.apply_chat_template([m.model_dump() for m in self.messages], add_generation_prompt=True)
        return tokenizer.encode(text)


def _param(loc: tuple[int | str, ...]) -> str:
    """('messages', 0, 'content') -> 'messages[0].content'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def parse(request_class: type[GenerationRequest], body: bytes) -> GenerationRequest:
    """A request body -> the request, or an APIError(400) naming the first bad field."""
    try:
        return request_class.model_validate_json(body)
    except ValidationError as e:
        error = e.errors(include_url=False, include_input=False)[0]
        if error["type"] == "json_invalid":
            raise bad_request(f"the body is not valid JSON ({error['ctx']['error']})") from None
        param = _param(error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        raise bad_request(f"{param}: {message}" if param else f"the body: {message}", param=param or None) from None


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Reply:
    """The bodies of one answer: the whole response, or its stream chunks (same id and `created`)."""

    object: ClassVar[str]
    chunk_object: ClassVar[str]
    id_prefix: ClassVar[str]

    def __init__(self, model: str, include_usage: bool = False):
        self.id = f"{self.id_prefix}{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model, self.include_usage = model, include_usage

    def _envelope(self, object_: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model, "choices": choices}

    def response(self, text: str, finish_reason: str, counts: dict[str, int]) -> dict[str, Any]:
        return {**self._envelope(self.object, [self.choice(text, finish_reason)]), "usage": counts}

    def chunk(self, text: str, finish_reason: str | None = None) -> dict[str, Any]:
        body = self._envelope(self.chunk_object, [self.chunk_choice(text, finish_reason)])
        if self.include_usage:
            body["usage"] = None  # as OpenAI: null on every chunk but the last
        return body

    def usage_chunk(self, counts: dict[str, int]) -> dict[str, Any]:
        """The extra last chunk of a stream with `stream_options.include_usage`: no choices, the usage."""
        return {**self._envelope(self.chunk_object, []), "usage": counts}

    def opening_chunk(self) -> dict[str, Any] | None:
        return None

    def choice(self, text: str, finish_reason: str) -> dict[str, Any]:
        raise NotImplementedError

    def chunk_choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        raise NotImplementedError


class CompletionReply(Reply):
    object = chunk_object = "text_completion"
    id_prefix = "cmpl-"

    def choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    chunk_choice = choice


class ChatReply(Reply):
    object, chunk_object = "chat.completion", "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def choice(self, text: str, finish_reason: str) -> dict[str, Any]:
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish_reason}

    def chunk_choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        delta = {"content": text} if text or finish_reason is None else {}  # the last chunk's delta is {}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    def opening_chunk(self) -> dict[str, Any]:
        """OpenAI's first chat chunk names the role."""
        body = self.chunk("")
        body["choices"][0]["delta"] = {"role": "assistant", "content": ""}
        return body
