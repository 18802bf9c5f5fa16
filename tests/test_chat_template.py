"""Chat templates render exactly as transformers' `apply_chat_template(..., tokenize=False)` renders them:
Qwen's ChatML from the files init-weights writes, a template using the environment's extras, the
template file that wins over the config's, ChatML as the default; template errors are one-line errors."""

from __future__ import annotations

import json
import shutil

import pytest

from qcompile.errors import UserError
from qcompile.run import qwen_vocab
from qcompile.run.tokenizer import Tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Where is the gold?"}],
    [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4."},
     {"role": "user", "content": "And 3 + 3?"}],
    [{"role": "system", "content": "Réponds en français.\nBrièvement."},
     {"role": "user", "content": "  spaces  and\ttabs\n\n"}, {"role": "assistant", "content": "D'accord 👍"},
     {"role": "user", "content": "你好"}],
]

# Uses what transformers' environment adds: namespace, loop controls, {% generation %}, raise_exception,
# tojson without HTML escaping, dict(), the special tokens by name, trim_blocks/lstrip_blocks; and its
# input handling: None-valued keys dropped, `reasoning` aliased to reasoning_content.
FEATURE_TEMPLATE = """{%- set ns = namespace(turns=0) -%}
{{ bos_token or '[no bos]' }}
{% for m in messages %}
    {% if m.role == 'tool' %}{{ raise_exception('tool messages are not supported') }}{% endif %}
    {% set ns.turns = ns.turns + 1 %}
    {% if loop.index > 4 %}{% break %}{% endif %}
    {% generation %}[{{ m.role }}] {{ m.content | trim }}{% endgeneration %}
    {{ m | tojson }}
    {% if m.reasoning_content is defined %}<think>{{ m.reasoning_content }}</think>{% endif %}
    {% if 'name' in m %}(name present){% endif %}
{% endfor %}
turns={{ ns.turns }} eos={{ eos_token }} pad={{ pad_token }} {{ dict(a=1, b=[1, 'é']) | tojson }}
{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

FEATURE_MESSAGES = [
    {"role": "system", "content": "<b>bold & \"quoted\"</b>", "name": None},
    {"role": "user", "content": "  héllo  "},
    {"role": "assistant", "content": "ok", "reasoning": "because"},
    {"role": "user", "content": "more"}, {"role": "user", "content": "cut by break"},
]


def tokenizer_dir(tmp_path, text_checkpoint, *, config_template=..., template_file: str | None = None):
    """A copy of the checkpoint's tokenizer files with the config's chat_template replaced (None:
    removed) and, optionally, a chat_template.jinja."""
    directory = tmp_path / "tok"
    directory.mkdir(parents=True)
    shutil.copy(text_checkpoint / "tokenizer.json", directory)
    config = json.loads((text_checkpoint / "tokenizer_config.json").read_text())
    if config_template is None:
        del config["chat_template"]
    elif config_template is not ...:
        config["chat_template"] = config_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    if template_file is not None:
        (directory / "chat_template.jinja").write_text(template_file)
    return directory


def transformers_tokenizer(directory):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(directory)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chatml_as_transformers_renders_it(text_checkpoint, add_generation_prompt):
    ours, theirs = Tokenizer.from_directory(text_checkpoint), transformers_tokenizer(text_checkpoint)
    for messages in CONVERSATIONS:
        expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected
    first = ours.apply_chat_template(CONVERSATIONS[0])  # no system message: ChatML's default one
    assert first.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert first.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_environment_extras_as_transformers(tmp_path, text_checkpoint, add_generation_prompt):
    directory = tokenizer_dir(tmp_path, text_checkpoint, config_template=FEATURE_TEMPLATE)
    expected = transformers_tokenizer(directory).apply_chat_template(
        FEATURE_MESSAGES, tokenize=False, add_generation_prompt=add_generation_prompt)
    ours = Tokenizer.from_directory(directory).apply_chat_template(FEATURE_MESSAGES, add_generation_prompt)
    assert ours == expected
    assert "<b>bold & \\\"quoted\\\"</b>" in ours and "<think>because</think>" in ours and "turns=5" in ours


def test_template_file_wins_over_the_config(tmp_path, text_checkpoint):
    directory = tokenizer_dir(tmp_path, text_checkpoint, template_file=FEATURE_TEMPLATE)
    expected = transformers_tokenizer(directory).apply_chat_template(FEATURE_MESSAGES, tokenize=False)
    assert Tokenizer.from_directory(directory).apply_chat_template(FEATURE_MESSAGES, False) == expected


def test_chatml_is_the_default_without_a_template(tmp_path, text_checkpoint):
    directory = tokenizer_dir(tmp_path, text_checkpoint, config_template=None)
    theirs = transformers_tokenizer(directory)
    for messages in CONVERSATIONS:
        expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                              chat_template=qwen_vocab.CHATML_TEMPLATE)
        assert Tokenizer.from_directory(directory).apply_chat_template(messages) == expected


def test_template_errors_are_one_line(tmp_path, text_checkpoint):
    directory = tokenizer_dir(tmp_path, text_checkpoint, config_template=FEATURE_TEMPLATE)
    tok = Tokenizer.from_directory(directory)
    with pytest.raises(UserError, match=f"{directory}: chat template: tool messages are not supported"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    with pytest.raises(UserError, match=r"messages\[1\]: expected an object"):
        tok.apply_chat_template([{"role": "user", "content": "x"}, "not a message"])
    with pytest.raises(UserError, match="non-empty list"):
        tok.apply_chat_template([])
    chatml = Tokenizer.from_directory(text_checkpoint)
    with pytest.raises(UserError, match="chat template: cannot render these messages"):
        chatml.apply_chat_template([{"role": "user", "content": ["a list", "not text"]}])
    broken = Tokenizer.from_directory(tokenizer_dir(tmp_path / "b", text_checkpoint,
                                                    template_file="{% for m in messages %}{{ m.content }"))
    with pytest.raises(UserError, match="chat template: Jinja syntax error on line 1"):
        broken.apply_chat_template(CONVERSATIONS[0])
