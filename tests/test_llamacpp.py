"""`bench --vs llama.cpp` without llama.cpp: the GGUF writer round-trips a tiny Qwen2 checkpoint (keys,
names, shapes in GGUF's reversed order, values), the tokenizer keys are copied and padded, errors are one
line, and the engine's wiring is driven by stand-ins for llama-bench/llama-quantize that check the
command line they get. Never builds llama.cpp, never touches the network."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from qcompile.cli import main
from qcompile.errors import UserError
from qcompile.measure import bench, llamacpp
from qcompile.measure.gguf_export import tensor_names, write_gguf
from qcompile.run import threads
from qcompile.spec.model import resolve_model

from .conftest import write_hf_checkpoint

gguf = pytest.importorskip("gguf")

VOCAB_TOKENS = 190  # fewer than the tiny model's 200 rows: the writer pads as llama.cpp's converter does


def write_vocab(path: Path, tokens: int = VOCAB_TOKENS) -> Path:
    """A vocab-only GGUF shaped like llama.cpp's models/ggml-vocab-qwen2.gguf (gpt2 BPE, qwen2 pre)."""
    writer = gguf.GGUFWriter(path, "qwen2")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list([f"t{i}" for i in range(tokens)])
    writer.add_token_types([int(gguf.TokenType.NORMAL)] * (tokens - 1) + [int(gguf.TokenType.CONTROL)])
    writer.add_token_merges(["t 1", "t1 2"])
    writer.add_eos_token_id(tokens - 1)
    writer.add_chat_template("{{ messages }}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return path


def field(reader, key):
    return reader.fields[key].contents()


@pytest.mark.parametrize("fields", [{}, {"tie_word_embeddings": True, "num_key_value_heads": 4}],
                         ids=["untied-gqa", "tied-mha"])
def test_gguf_round_trips_the_checkpoint(tmp_path, fields):
    checkpoint = write_hf_checkpoint(tmp_path / "ckpt", **fields)
    spec = resolve_model(str(checkpoint))
    cfg = spec.config
    out = tmp_path / "f32.gguf"
    write_gguf(spec, checkpoint, out, vocab=write_vocab(tmp_path / "vocab.gguf"), log=lambda _m: None)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left

    reader = gguf.GGUFReader(out)
    hyper = {"general.architecture": "qwen2", "general.file_type": 0,
             "qwen2.context_length": cfg.max_position_embeddings, "qwen2.embedding_length": cfg.hidden_size,
             "qwen2.feed_forward_length": cfg.intermediate_size, "qwen2.block_count": cfg.num_hidden_layers,
             "qwen2.attention.head_count": cfg.num_attention_heads,
             "qwen2.attention.head_count_kv": cfg.num_key_value_heads}
    for key, value in hyper.items():
        assert field(reader, key) == value, key
    assert field(reader, "qwen2.rope.freq_base") == pytest.approx(cfg.rope_theta)
    assert field(reader, "qwen2.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.rms_norm_eps)

    # the tokenizer, copied and padded to vocab_size rows
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == cfg.vocab_size == 200
    assert tokens[:3] == ["t0", "t1", "t2"] and tokens[VOCAB_TOKENS:] == [f"[PAD{i}]" for i in range(190, 200)]
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[VOCAB_TOKENS - 1] == gguf.TokenType.CONTROL and set(types[VOCAB_TOKENS:]) == {gguf.TokenType.UNUSED}
    assert field(reader, "tokenizer.ggml.model") == "gpt2" and field(reader, "tokenizer.ggml.pre") == "qwen2"
    assert field(reader, "tokenizer.ggml.merges") == ["t 1", "t1 2"]
    assert field(reader, "tokenizer.ggml.eos_token_id") == VOCAB_TOKENS - 1
    assert field(reader, "tokenizer.chat_template") == "{{ messages }}"

    # every tensor: llama.cpp's name, GGUF dims = numpy dims reversed, the checkpoint's values as float32
    hf = load_file(checkpoint / "model.safetensors")
    names = tensor_names(spec)
    written = {t.name: t for t in reader.tensors}
    assert set(written) == set(names.values())
    expected_names = {"token_embd.weight", "output_norm.weight", "blk.0.attn_q.bias", "blk.1.attn_output.weight",
                      "blk.1.ffn_gate.weight", "blk.1.ffn_up.weight", "blk.1.ffn_down.weight",
                      "blk.0.attn_norm.weight", "blk.0.ffn_norm.weight"}
    assert expected_names <= set(written)
    assert ("output.weight" in written) == (not cfg.tie_word_embeddings)
    for hf_name, name in names.items():
        tensor = written[name]
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32, name
        assert list(tensor.shape) == list(reversed(hf[hf_name].shape)), name
        np.testing.assert_array_equal(np.asarray(tensor.data), hf[hf_name], err_msg=name)
    # llama.cpp's qwen2 loader wants wq {n_embd, n_embd}, wk {n_embd, n_embd_k_gqa}, ffn_down {n_ff, n_embd}
    head = cfg.resolved_head_dim
    assert list(written["blk.0.attn_q.weight"].shape) == [cfg.hidden_size, cfg.hidden_size]
    assert list(written["blk.0.attn_k.weight"].shape) == [cfg.hidden_size, cfg.num_key_value_heads * head]
    assert list(written["blk.0.ffn_down.weight"].shape) == [cfg.intermediate_size, cfg.hidden_size]


def test_bf16_checkpoint_is_written_as_float32(tmp_path):
    import torch

    checkpoint = write_hf_checkpoint(tmp_path / "ckpt", dtype=torch.bfloat16)
    spec = resolve_model(str(checkpoint))
    write_gguf(spec, checkpoint, tmp_path / "f32.gguf", vocab=None, log=lambda _m: None)
    hf = load_file(checkpoint / "model.safetensors")
    tensor = next(t for t in gguf.GGUFReader(tmp_path / "f32.gguf").tensors if t.name == "blk.1.ffn_down.weight")
    np.testing.assert_array_equal(np.asarray(tensor.data), hf["model.layers.1.mlp.down_proj.weight"].astype(np.float32))


def test_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="qwen2 family only, not 'qwen3_moe'"):
        tensor_names(resolve_model("qwen3-moe-debug"))
    with pytest.raises(UserError, match="compares decoders"):
        llamacpp.check_model(resolve_model("vit-debug"))
    with pytest.raises(UserError, match="needs head_dim x num_attention_heads == hidden_size, here 32 x 4 != 64"):
        tensor_names(resolve_model(str(write_hf_checkpoint(tmp_path / "hd", head_dim=32))))
    checkpoint = write_hf_checkpoint(tmp_path / "ckpt")
    spec = resolve_model(str(checkpoint))
    with pytest.raises(UserError, match="ckpt: vocab_size 200 is smaller than the tokenizer's 300 tokens"):
        write_gguf(spec, checkpoint, tmp_path / "x.gguf", vocab=write_vocab(tmp_path / "v.gguf", 300))
    assert not (tmp_path / "x.gguf").exists()
    with pytest.raises(UserError, match="--llama-quant: unknown type 'q3'"):
        llamacpp.engine_names(("q8_0", "q3"))
    with pytest.raises(UserError, match="QCOMPILE_LLAMA_CPP=.*: no llama-bench"):
        llamacpp._existing(tmp_path)


def test_missing_toolchain_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("QCOMPILE_HOME", str(tmp_path))
    monkeypatch.delenv(llamacpp.ENV, raising=False)
    monkeypatch.setattr(llamacpp.shutil, "which", lambda _name: None)
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(UserError, match="building llama.cpp needs cmake and a C\\+\\+ compiler"):
        llamacpp.tools(log=lambda _m: None)


def test_cli_refuses_bad_comparisons(capsys):
    """Each before any build: one line on stderr, status 2."""
    for argv, message in ((["qwen2-debug", "--vs", "onnx"], "--vs: unknown engine family 'onnx'"),
                          (["qwen2-debug", "--llama-quant", "q8_0"], "--llama-quant needs --vs llama.cpp"),
                          (["qwen2-debug", "--vs", "torch", "--vs", "llama.cpp", "--skip", "llama.cpp-q9"],
                           "--skip: unknown engine(s) ['llama.cpp-q9']"),
                          (["vit-debug", "--vs", "torch,llama.cpp"], "vit-debug: --vs llama.cpp compares decoders"),
                          (["qwen3-moe-debug", "--vs", "llama.cpp"], "qwen2 family only, not 'qwen3_moe'")):
        assert main(["bench", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


# --- the engine, with stand-ins for the two llama.cpp tools -------------------------------------------

FAKE_BENCH = """#!{python}
# Stands in for llama-bench: checks the command line, answers in llama-bench's JSON format.
import json, sys
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
assert args["-o"] == "json" and args["-m"].endswith(".gguf"), sys.argv
if open(args["-m"], "rb").read(4) != b"GGUF":
    sys.exit("not a GGUF")
open({log!r}, "a").write(json.dumps(sys.argv[1:]) + "\\n")
p, n, r = int(args["-p"]), int(args["-n"]), int(args["-r"])
common = dict(build_commit="abc", build_number=1, model_type="qwen2 ?B all F32", model_size=1000,
              n_threads=int(args["-t"]), cpu_info="test CPU")
print(json.dumps([dict(common, n_prompt=p, n_gen=0, samples_ns=[2 * 10**9, 10**9, 3 * 10**9][:r]),
                  dict(common, n_prompt=0, n_gen=n, samples_ns=[4 * 10**9, 5 * 10**9, 6 * 10**9][:r])]))
"""
FAKE_QUANTIZE = """#!{python}
# Stands in for llama-quantize: IN OUT TYPE THREADS; copies IN (a GGUF) to OUT.
import shutil, sys
assert sys.argv[3] in ("Q8_0", "Q4_0"), sys.argv
shutil.copyfile(sys.argv[1], sys.argv[2])
"""


@pytest.fixture
def fake_llama_cpp(tmp_path, monkeypatch) -> Path:
    tree = tmp_path / "llama.cpp"
    (tree / "build" / "bin").mkdir(parents=True)
    (tree / "models").mkdir()
    write_vocab(tree / "models" / llamacpp.VOCAB, 200)
    calls = tmp_path / "calls.jsonl"
    for tool, text in (("llama-bench", FAKE_BENCH), ("llama-quantize", FAKE_QUANTIZE)):
        path = tree / "build" / "bin" / tool
        path.write_text(text.format(python=sys.executable, log=str(calls)))
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv(llamacpp.ENV, str(tree / "build"))
    return calls


def test_engine_writes_the_ggufs_once_and_reports_llama_bench_figures(tmp_path, fake_llama_cpp):
    checkpoint = write_hf_checkpoint(tmp_path / "ckpt")
    spec = resolve_model(str(checkpoint))
    engines = bench._engines(spec, ("llama.cpp",), ("q8_0", "q4_0"), ("llama.cpp-q4_0",))
    assert engines == ["qcompile-tuned", "qcompile-default", "llama.cpp-f32", "llama.cpp-q8_0"]
    logged = []
    llama = bench._llama_files(spec, checkpoint, ("q8_0",), engines, logged.append)
    f32 = tmp_path / "ckpt-gguf" / "f32.gguf"
    assert llama["files"] == {"llama.cpp-f32": f32, "llama.cpp-q8_0": tmp_path / "ckpt-gguf" / "q8_0.gguf"}
    assert llama["scales"] == {"llama.cpp-f32": 1.0, "llama.cpp-q8_0": 1.0}  # the stand-in copies
    assert len(gguf.GGUFReader(f32).fields["tokenizer.ggml.tokens"].data) == 200
    # cached: a second call writes nothing; new weights rewrite the F32 file and drop the quantized one
    mtime = f32.stat().st_mtime_ns
    bench._llama_files(spec, checkpoint, ("q8_0",), engines, logged.append)
    assert f32.stat().st_mtime_ns == mtime
    write_hf_checkpoint(checkpoint, seed=1)
    bench._llama_files(spec, checkpoint, (), ["llama.cpp-f32"], logged.append)
    assert f32.stat().st_mtime_ns != mtime and not (tmp_path / "ckpt-gguf" / "q8_0.gguf").exists()

    figures = bench.run_engine("llama.cpp-f32", library=str(f32), checkpoint=str(checkpoint), prompt_len=16,
                               decode_tokens=4, repeats=3, llama_bench=str(llama["tools"].bench))
    argv = json.loads(fake_llama_cpp.read_text().splitlines()[-1])
    assert argv == ["-m", str(f32), "-p", "16", "-n", "4", "-t", str(threads.count()), "-r", "3",
                    "-o", "json"]
    assert figures["prefill_seconds"] == pytest.approx(2.0)  # median of the samples
    assert figures["decode_tokens_per_s"] == pytest.approx(4 / 5.0)
    assert figures["llama_cpp"]["model_type"] == "qwen2 ?B all F32" and figures["peak_rss_bytes"] > 0
    figures["weight_bytes_scale"] = 0.25  # a quantized file: its decode limit is on a quarter of the bytes
    bench._add_fractions(figures, {"decode_tokens_per_s": 8.0, "prefill_seconds": 1.0})
    assert figures["decode_fraction_of_limit"] == pytest.approx(0.8 / 32)
    assert figures["prefill_fraction_of_limit"] == pytest.approx(0.5)


FAKE_BATCHED_BENCH = """#!{python}
# Stands in for llama-batched-bench: checks the command line, answers one JSON line per -npl count.
import json, sys
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
assert args["--output-format"] == "jsonl" and args["-m"].endswith(".gguf"), sys.argv
pp, tg = int(args["-npp"]), int(args["-ntg"])
assert int(args["-c"]) >= max(map(int, args["-npl"].split(","))) * (pp + tg), sys.argv
for pl in map(int, args["-npl"].split(",")):
    print(json.dumps(dict(n_kv_max=int(args["-c"]), pp=pp, tg=tg, pl=pl, t_pp=0.5 * pl, speed_pp=pp / 0.5,
                          t_tg=tg / (10.0 * pl), speed_tg=10.0 * pl, t=1.0, speed=1.0)))
"""


def test_batched_bench_reports_aggregate_decode_per_stream_count(tmp_path):
    tool = tmp_path / llamacpp.BATCHED_BENCH
    tool.write_text(FAKE_BATCHED_BENCH.format(python=sys.executable))
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    rows = llamacpp.run_batched_bench(tool=tool, gguf=tmp_path / "f32.gguf", prompt_len=128, decode_tokens=32,
                                      streams=[1, 4, 8], threads=2)
    assert rows == [{"streams": s, "prefill_seconds": 0.5 * s, "decode_tokens_per_s": 10.0 * s} for s in (1, 4, 8)]
