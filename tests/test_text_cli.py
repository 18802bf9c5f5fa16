"""`qcompile run --prompt` and `qcompile chat`: text in, text out from the command line, the same text
the Python API gives; the chat keeps its history, /reset clears it, end of input exits; bad text
requests are one-line errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

import qcompile
from qcompile.cli import main


@pytest.fixture(scope="module")
def model(text_library, text_checkpoint):
    return qcompile.load(text_library, weights=text_checkpoint)


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_run_prompt_prints_the_generated_text(capsys, model, text_library, text_checkpoint):
    code, out, err = cli(capsys, "run", text_library, "--weights", text_checkpoint, "--prompt", "Once upon a",
                         "--max-new-tokens", 12, "--temperature", 0.8, "--top-k", 40, "--seed", 11)
    assert code == 0, err
    assert out == model.generate_text("Once upon a", max_tokens=12, temperature=0.8, top_k=40, seed=11) + "\n"
    assert re.search(r"\[3 prompt tokens, prefill [\d.]+ ms; \d+ new tokens, [\d.]+ tokens/s; finish: \w+\]", err)


def test_run_prompt_json_and_chat(capsys, model, text_library, text_checkpoint):
    code, out, err = cli(capsys, "run", text_library, "--weights", text_checkpoint, "--prompt", "Hi!",
                         "--chat", "--system", "Be brief.", "--max-new-tokens", 8, "--stop", "zz", "--json")
    assert code == 0, err
    result = json.loads(out)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    assert result["prompt_ids"] == model.tokenizer.encode(model.tokenizer.apply_chat_template(messages))
    assert result["text"] == model.chat(messages, max_tokens=8, stop=["zz"])
    assert result["finish_reason"] in ("length", "stop") and len(result["generated_ids"]) <= 8
    assert result["decode_tokens_per_s"] > 0 and result["prefill_seconds"] > 0


@pytest.mark.parametrize("extra,needle", [
    (["--prompt", "x", "--prompt-ids", "1"], "run: give --prompt or --prompt-ids, not both"),
    (["--prompt-ids", "1", "--temperature", "0.5"], "run: --temperature needs --prompt"),
    (["--prompt-ids", "1", "--chat"], "run: --chat needs --prompt"),
    (["--prompt", "x", "--system", "s"], "run: --system needs --chat"),
    (["--prompt", "x", "--eos-id", "3"], "run: --eos-id applies to --prompt-ids"),
    (["--prompt", "x", "--top-p", "1.5"], "sampling: field 'top_p' must be in (0, 1], got 1.5"),
    (["--prompt", "x", "--seed", "x"], "argument --seed: invalid int value"),
    (["--prompt", "x", "--max-new-tokens", "300"], "exceeds the library's max_seq_len 256"),
    ([], "run: --prompt or --prompt-ids is needed for this decoder"),
])
def test_bad_text_requests(capsys, text_library, text_checkpoint, extra, needle):
    code, _, err = cli(capsys, "run", text_library, "--weights", text_checkpoint, *extra)
    assert code == 2 and err.startswith("qcompile: error: ") and err.count("\n") == 1, err
    assert needle in err, err


def test_text_on_a_checkpoint_without_tokenizer_names_it(capsys, debug_library, debug_checkpoint):
    for command in (["run", debug_library, "--prompt", "hello"], ["chat", debug_library]):
        code, _, err = cli(capsys, *command, "--weights", debug_checkpoint)
        assert code == 2 and err == f"qcompile: error: {debug_checkpoint}: no tokenizer files (tokenizer.json, " \
                                    f"or vocab.json + merges.txt)\n", err


def test_chat_keeps_history_resets_and_exits_at_end_of_input(model, text_library, text_checkpoint):
    """Driven through stdin in a real process: every reply is what model.chat gives for the history."""
    proc = subprocess.run(
        [sys.executable, "-m", "qcompile", "chat", str(text_library), "--weights", str(text_checkpoint),
         "--system", "Be terse.", "--max-new-tokens", "8"],
        input="Tell me a story\nAnd then?\n\n/reset\nAnd then?\n", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    system = {"role": "system", "content": "Be terse."}
    first = model.chat([system, {"role": "user", "content": "Tell me a story"}], max_tokens=8)
    second = model.chat([system, {"role": "user", "content": "Tell me a story"},
                         {"role": "assistant", "content": first}, {"role": "user", "content": "And then?"}],
                        max_tokens=8)
    after_reset = model.chat([system, {"role": "user", "content": "And then?"}], max_tokens=8)
    assert second != after_reset  # the history changed the reply
    assert proc.stdout == f"> {first}\n> {second}\n> > > {after_reset}\n> \n"
    assert len(re.findall(r"^\[\d+ tokens, [\d.]+ tokens/s\]$", proc.stderr, re.M)) == 3
    assert "(history cleared)" in proc.stderr and "Traceback" not in proc.stderr
