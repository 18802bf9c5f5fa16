"""Generation with a compiled model and Qwen's real tokenizer: greedy text is the library's greedy ids
decoded, chunks stream to the one-shot decode, stop strings / stop tokens / max tokens / cancellation
end it as OpenAI's API does, seeds repeat, bad requests are refused before any work; the Python API
(`model.generate_text`, `model.chat`)."""

from __future__ import annotations

import pytest

import qcompile
from qcompile.errors import UserError
from qcompile.run.generation import SamplingParams, StopStrings, generate

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def model(text_library, text_checkpoint):
    return qcompile.load(text_library, weights=text_checkpoint)


def run(model, prompt: str = PROMPT, **fields):
    chunks = list(generate(model, model.tokenizer, model.tokenizer.encode(prompt), SamplingParams(**fields)))
    assert all(c.finish_reason is None for c in chunks[:-1]) and chunks[-1].finish_reason is not None
    return chunks, [t for c in chunks for t in c.token_ids], "".join(c.text for c in chunks)


@pytest.fixture
def no_eos(model, monkeypatch):
    """Generation that only max_tokens (or what a test adds) ends: a random model may emit an end token."""
    monkeypatch.setattr(model.tokenizer, "eos_token_ids", [])


def test_greedy_text_is_the_librarys_greedy_ids_decoded(model, no_eos):
    chunks, ids, text = run(model, max_tokens=24)
    prompt = model.tokenizer.encode(PROMPT)
    assert ids == model.generate(prompt, 24).tolist()
    assert text == model.tokenizer.decode(ids) and chunks[-1].finish_reason == "length" and len(ids) == 24
    assert [len(c.token_ids) for c in chunks] == [1] * 24  # one chunk per token
    assert model.last_stats.new_tokens == 24 and model.last_stats.decode_tokens_per_s > 0


def test_stop_string_ends_the_text_before_it(model, no_eos):
    _, ids, text = run(model, max_tokens=24)
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip() and text.find(stop) > 0
    chunks, stopped_ids, stopped_text = run(model, max_tokens=24, stop=["never appears", stop])
    assert chunks[-1].finish_reason == "stop" and stopped_text == text[:text.find(stop)]
    # Generation ended at the token that completed the stop string, not later.
    at = next(n for n in range(1, 25) if stop in model.tokenizer.decode(ids[:n]))
    assert stopped_ids == ids[:at]


def test_stop_token_and_eos_end_generation_without_their_text(model, no_eos, monkeypatch):
    _, ids, _ = run(model, max_tokens=12)
    chunks, stopped_ids, text = run(model, max_tokens=12, stop_token_ids=[ids[5]])
    first = ids.index(ids[5])
    assert stopped_ids == ids[:first + 1] and chunks[-1].finish_reason == "stop"
    assert chunks[-1].token_ids == [ids[5]] and text == model.tokenizer.decode(ids[:first])
    monkeypatch.setattr(model.tokenizer, "eos_token_ids", [ids[3]])
    _, eos_ids, _ = run(model, max_tokens=12)
    assert eos_ids == ids[:ids.index(ids[3]) + 1]


def test_cancellation_before_the_next_decode_step(model, no_eos):
    asked = []

    def cancelled():
        asked.append(True)
        return len(asked) > 4  # before the prefill, then after each of the first 4 tokens

    prompt = model.tokenizer.encode(PROMPT)
    chunks = list(generate(model, model.tokenizer, prompt, SamplingParams(max_tokens=20), cancelled=cancelled))
    assert [c.finish_reason for c in chunks] == [None] * 4 + ["cancelled"]
    assert sum(len(c.token_ids) for c in chunks) == 4
    assert list(generate(model, model.tokenizer, prompt, SamplingParams(), cancelled=lambda: True)) == [
        type(chunks[0])("", [], "cancelled")]


def test_seeded_sampling_repeats(model, no_eos):
    sample = dict(max_tokens=16, temperature=1.0, top_p=0.95, top_k=50, seed=1234)
    _, first, text = run(model, **sample)
    _, again, _ = run(model, **sample)
    _, other, _ = run(model, **{**sample, "seed": 99})
    assert first == again and first != other
    assert text == model.tokenizer.decode(first)


def test_penalties_as_hfs_processor_over_the_same_model(model, no_eos):
    """Greedy with a repetition penalty = a loop over the library's logits through transformers'
    RepetitionPenaltyLogitsProcessor (prompt and generated tokens count); here it changes the output."""
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor

    prompt_text = "Hello"
    ids = model.tokenizer.encode(prompt_text)
    penalty, expected = RepetitionPenaltyLogitsProcessor(1.3), []
    logits = model.prefill(ids)[-1]
    for _ in range(16):
        scores = penalty(torch.tensor([ids + expected]), torch.from_numpy(logits)[None])[0]
        expected.append(int(scores.argmax()))
        logits = model.decode(expected[-1])
    _, penalised, _ = run(model, prompt_text, max_tokens=16, repetition_penalty=1.3)
    assert penalised == expected and penalised != run(model, prompt_text, max_tokens=16)[1]


def test_bad_requests_are_refused_before_any_work(model):
    prompt = model.tokenizer.encode(PROMPT)
    with pytest.raises(UserError, match=r"prompt \(5 tokens\) \+ max_tokens \(252\) exceeds the library's "
                                        r"max_seq_len 256"):
        generate(model, model.tokenizer, prompt, SamplingParams(max_tokens=252))
    with pytest.raises(UserError, match="prompt: no tokens"):
        generate(model, model.tokenizer, [], SamplingParams())
    with pytest.raises(UserError, match="token id 151936 is out of range"):
        generate(model, model.tokenizer, prompt, SamplingParams(stop_token_ids=[151936]))
    with pytest.raises(UserError, match="field 'top_p'"):
        generate(model, model.tokenizer, prompt, SamplingParams(top_p=2.0))
    assert list(generate(model, model.tokenizer, prompt, SamplingParams(max_tokens=0)))[-1].finish_reason == "length"


def test_python_api_text_and_chat(model, no_eos):
    text = model.generate_text(PROMPT, max_tokens=10)
    assert text == run(model, max_tokens=10)[2]
    assert "".join(model.generate_text(PROMPT, stream=True, max_tokens=10)) == text
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi!"}]
    reply = model.chat(messages, max_tokens=10, temperature=0.7, seed=5)
    assert reply == "".join(model.chat(messages, stream=True, max_tokens=10, temperature=0.7, seed=5))
    rendered = model.tokenizer.apply_chat_template(messages)
    assert reply == run(model, rendered, max_tokens=10, temperature=0.7, seed=5)[2]
    with pytest.raises(UserError, match="unknown field 'temprature'"):
        model.generate_text(PROMPT, temprature=0.5)


def test_text_needs_a_tokenizer(debug_library, debug_checkpoint):
    model = qcompile.load(debug_library, weights=debug_checkpoint)
    with pytest.raises(UserError, match=f"{debug_checkpoint}: no tokenizer files"):
        model.generate_text("hello")


@pytest.mark.parametrize("pieces,stop,expected_out,expected_stop", [
    (["ab", "c", "de"], ["cd"], ["ab", "", ""], True),  # held "c" could start "cd"
    (["ab", "c", "x"], ["cd"], ["ab", "", "cx"], False),  # ... and is released when it cannot
    (["xEN", "D!"], ["END"], ["x", ""], True),
    (["aaa"], ["ab"], ["aa"], False),  # only the longest possible start is held
    (["one STOP two STOP"], ["STOP", "one"], [""], True),  # the earliest occurrence wins
])
def test_stop_strings(pieces, stop, expected_out, expected_stop):
    stops = StopStrings(stop)
    outs, stopped = [], False
    for piece in pieces:
        out, stopped = stops.feed(piece)
        outs.append(out)
        if stopped:
            break
    assert outs == expected_out and stopped == expected_stop

