"""Block-level parity with transformers: each block of `qcompile.models` compiled alone for llvm and run
on random float32 inputs against the Hugging Face module it is named after (or HF's own functions), so
a kernel change is caught in seconds, before any whole-model test. Every block compiles once per module
or parametrisation (module-scoped fixtures); shapes are symbolic where the models' are.

Layouts: our decoder blocks run one sequence, [n, hidden] (HF: [1, n, hidden]); a layer's KV cache is two
buffers [slots, kv_heads, head_dim] updated in place, position q in slot q % slots (HF's DynamicCache:
[1, kv_heads, p, head_dim]). Fused projections are HF's
weights concatenated along axis 0 (q,k,v -> qkv; gate,up -> gate_up).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from tvm import relax
from tvm.relax.frontend import nn

from qcompile.models import layers, vit, vit_graph

from .conftest import CPU_TOLERANCE, max_rel_diff

F32 = "float32"
PLAIN = {"param_mode": "plain", "effect_mode": "none"}


def _compile_block(module, spec):
    """Export `module` with `spec` (method -> argument specs), compile for llvm -> (vm, parameter names
    in the order the methods take them, after the inputs)."""
    mod, params = module.export_tvm(spec=spec)
    vm = relax.VirtualMachine(tvm.compile(mod, tvm.target.Target({"kind": "llvm"})), tvm.cpu())
    return vm, [name for name, _ in params]


def _tensor(x) -> tvm.runtime.Tensor:
    if isinstance(x, torch.Tensor):
        x = x.detach().numpy()
    return tvm.runtime.tensor(np.ascontiguousarray(x, dtype=np.float32))


def _params(names, weights: dict) -> list:
    """Our parameters in `names` order from {our name: torch tensor or list of them, fused on axis 0}."""
    assert set(names) == set(weights), (sorted(names), sorted(weights))
    out = []
    for name in names:
        w = weights[name]
        out.append(_tensor(torch.cat(list(w), dim=0) if isinstance(w, (list, tuple)) else w))
    return out


def _randomise(module: torch.nn.Module, seed: int, std: float = 0.15) -> torch.nn.Module:
    """Every weight and bias N(0, std), norm weights 1 + N(0, std) (HF's default init leaves biases at 0
    and norms at 1, which would test neither)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.normal_(0.0, std)
            if "norm" in name and name.endswith("weight"):
                p.add_(1.0)
    return module.eval()


def _randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- RoPE -------------------------------------------------------------------------------------------

ROPE_CASES = [(16, 10000.0), (64, 1e6), (128, 1e6)]  # (head_dim, rope_theta)


@pytest.fixture(scope="module", params=ROPE_CASES, ids=[f"d{d}-theta{t:g}" for d, t in ROPE_CASES])
def rope(request):
    """layers.apply_rope compiled for one (head_dim, theta): x [n, heads, d], offset -> [n, heads, d]."""
    head_dim, theta = request.param

    class Rope(nn.Module):
        def forward(self, x, offset):
            return layers.apply_rope(x, offset, theta)

    spec = {"forward": {"x": nn.spec.Tensor(["n", "heads", head_dim], F32), "offset": nn.spec.Int(),
                        "$": PLAIN}}
    vm, names = _compile_block(Rope(), spec)
    assert names == []
    return head_dim, theta, vm


@pytest.mark.parametrize("offset", [1, 37, 32000])
def test_rope_matches_hf(rope, offset):
    """q (4 heads) and k (2 heads) at positions offset..offset+n-1 vs HF's Qwen2RotaryEmbedding +
    apply_rotary_pos_emb (rotate_half form, cos/sin computed in float32)."""
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding, apply_rotary_pos_emb

    head_dim, theta, vm = rope
    n = 6
    config = Qwen2Config(hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=2,
                         rope_parameters={"rope_type": "default", "rope_theta": theta})
    q = _randn(1, 4, n, head_dim, seed=offset)  # HF's layout [1, heads, n, d]
    k = _randn(1, 2, n, head_dim, seed=offset + 1)
    positions = torch.arange(offset, offset + n)[None]  # [1, n]
    cos, sin = Qwen2RotaryEmbedding(config)(q, positions)  # [1, n, d]
    hf_q, hf_k = apply_rotary_pos_emb(q, k, cos, sin)
    for x, ref in ((q, hf_q), (k, hf_k)):
        offset_arg = tvm.runtime.ShapeTuple([offset])
        ours = vm["forward"](_tensor(x[0].transpose(0, 1)), offset_arg).numpy()  # [n, h, d]
        assert max_rel_diff(ours, ref[0].transpose(0, 1).numpy()) <= CPU_TOLERANCE
    assert not torch.allclose(hf_q, q, atol=1e-2), "RoPE at a nonzero offset must move q"


# --- masked scores ----------------------------------------------------------------------------------

MASK_WINDOWS = {"causal": None, "window1": 1, "window4": 4, "window16": 16}
RING_SLOTS = 4  # a 4-slot buffer: a ring that has wrapped once a chunk starts at position >= 4
UNBOUNDED_SLOTS = 64  # a buffer longer than every test sequence: slot j holds position j


@pytest.fixture(scope="module")
def mask_vm():
    """layers.masked_scores for each window in MASK_WINDOWS and each buffer size: scores [heads, n,
    columns] of a chunk at `position` -> masked scores."""

    def method(window, slots):
        def masked(self, s, position):
            return layers.masked_scores(s, position, slots, window)
        return masked

    methods = {f"{name}-{slots}": method(window, slots) for name, window in MASK_WINDOWS.items()
               for slots in (RING_SLOTS, UNBOUNDED_SLOTS)}
    Masks = type("Masks", (nn.Module,), methods)
    spec = {name: {"s": nn.spec.Tensor(["heads", "n", "columns"], F32), "position": nn.spec.Int(), "$": PLAIN}
            for name in methods}
    return _compile_block(Masks(), spec)[0]


def _hf_mask(n: int, t: int, window: int | None) -> np.ndarray:
    """HF's eager mask [n, t] (0 visible, float32 lowest masked) for n new tokens after t - n cached ones,
    built as Qwen2Model builds it: create_(sliding_window_)causal_mask over a DynamicCache holding t - n."""
    from transformers import Qwen2Config
    from transformers.cache_utils import DynamicCache
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    config = Qwen2Config(num_hidden_layers=1, use_sliding_window=window is not None,
                         sliding_window=window, max_window_layers=0)
    config._attn_implementation = "eager"
    cache = DynamicCache()
    if t > n:
        cache.update(torch.zeros(1, 1, t - n, 8), torch.zeros(1, 1, t - n, 8), 0)
    make = create_causal_mask if window is None else create_sliding_window_causal_mask
    mask = make(config=config, inputs_embeds=torch.zeros(1, n, 8), attention_mask=None,
                past_key_values=cache, position_ids=torch.arange(t - n, t)[None])
    assert mask.shape == (1, 1, n, t)
    return mask[0, 0].numpy()


def key_column_positions(position: int, n: int, slots: int) -> np.ndarray:
    """The position of each key column of a chunk of n at `position` over a `slots`-row buffer, restated
    from the layout: slot s (s < min(position, slots)) holds the latest q < position with q % slots == s,
    then the chunk's own positions."""
    filled = [next(q for q in range(position - 1, -1, -1) if q % slots == s) for s in range(min(position, slots))]
    return np.array(filled + list(range(position, position + n)))


@pytest.mark.parametrize("n,t", [(1, 1), (7, 7), (1, 9), (3, 9), (6, 9)],
                         ids=["first-token", "prefill", "decode", "chunk-after-cache", "chunk-over-window"])
@pytest.mark.parametrize("slots", [UNBOUNDED_SLOTS, RING_SLOTS], ids=["buffer", "ring"])
@pytest.mark.parametrize("kind", list(MASK_WINDOWS))
def test_masked_scores_follow_hf_mask(mask_vm, kind, slots, n, t):
    """n new queries at positions t - n .. t - 1. Key column c (a filled slot or a chunk row) at position
    key_pos[c] stays iff HF's mask is 0 at key_pos[c], i.e. key_pos <= query pos and, sliding, key_pos >
    query pos - window; else it gets float32's lowest, bit for bit. On the ring (4 slots) the filled
    slots hold the last 4 positions out of order, and older positions are gone."""
    window = MASK_WINDOWS[kind]
    lowest = np.finfo(np.float32).min
    position = t - n
    key_pos = key_column_positions(position, n, slots)  # [columns]
    hf = _hf_mask(n, t, window)[:, key_pos]  # [n, columns]: HF's mask at each column's position
    pos = np.arange(position, t)[:, None]  # [n, 1]
    rule = (key_pos <= pos) & ((key_pos > pos - window) if window is not None else True)  # [n, columns]
    np.testing.assert_array_equal(hf == 0, rule)  # HF's rule, stated explicitly
    scores = _randn(3, n, key_pos.size, seed=n * 100 + t).numpy()  # [heads, n, columns]
    ours = mask_vm[f"{kind}-{slots}"](_tensor(scores), tvm.runtime.ShapeTuple([position])).numpy()
    np.testing.assert_array_equal(ours, np.where(rule[None], scores, lowest))
    if window is not None and window < t and slots == UNBOUNDED_SLOTS:
        # the window's edge: the last query's oldest key is t - window
        assert (ours[:, -1, t - window - 1] == lowest).all()
        np.testing.assert_array_equal(ours[:, -1, t - window:], scores[:, -1, t - window:])


# --- attention with a KV cache ----------------------------------------------------------------------

HIDDEN, HEADS, KV_HEADS = 64, 4, 2
FULL_SLOTS = 16  # a full layer's buffers: longer than every test sequence (max_seq_len)
# family, head_dim, q/k/v bias, window, rope_theta. Qwen3-MoE: qk-norm; its attention_bias also puts a
# bias on o_proj. A sliding layer's buffers have `window` slots.
ATTENTION_CASES = {
    "qwen2": ("qwen2", 16, True, None, 1e6),
    "qwen2-sliding": ("qwen2", 16, True, 5, 1e6),
    "qwen3-qknorm": ("qwen3_moe", 32, False, None, 1e6),
    "qwen3-qknorm-bias-sliding": ("qwen3_moe", 32, True, 5, 10000.0),
}


@pytest.fixture(scope="module", params=list(ATTENTION_CASES))
def attention_pair(request):
    """Our CausalSelfAttention (heads 4, kv heads 2) and HF's Qwen2Attention / Qwen3MoeAttention with the
    same random weights, HF's rotary embedding, and HF's mask builder for that layer kind."""
    from transformers import Qwen2Config, Qwen3MoeConfig
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
    from transformers.models.qwen2 import modeling_qwen2
    from transformers.models.qwen3_moe import modeling_qwen3_moe

    family, head_dim, bias, window, theta = ATTENTION_CASES[request.param]
    common = dict(hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                  num_hidden_layers=1, rms_norm_eps=1e-6,
                  rope_parameters={"rope_type": "default", "rope_theta": theta},
                  use_sliding_window=window is not None, sliding_window=window)
    if family == "qwen2":
        config = Qwen2Config(**common, max_window_layers=0)  # layer 0 slides when use_sliding_window
        attn_class, rotary_class = modeling_qwen2.Qwen2Attention, modeling_qwen2.Qwen2RotaryEmbedding
    else:
        config = Qwen3MoeConfig(**common, head_dim=head_dim, attention_bias=bias)
        attn_class = modeling_qwen3_moe.Qwen3MoeAttention
        rotary_class = modeling_qwen3_moe.Qwen3MoeRotaryEmbedding
    config._attn_implementation = "eager"
    hf = _randomise(attn_class(config, layer_idx=0), seed=len(request.param))
    assert hf.head_dim == head_dim
    qk_norm = family == "qwen3_moe"
    o_bias = qk_norm and bias
    has = (hf.q_proj.bias is not None, hf.o_proj.bias is not None, hasattr(hf, "q_norm"))
    assert has == (bias, o_bias, qk_norm)

    ours = layers.CausalSelfAttention(hidden=HIDDEN, heads=HEADS, kv_heads=KV_HEADS, head_dim=head_dim,
                                      qkv_bias=bias, o_bias=o_bias, rope_theta=theta, window=window,
                                      qk_norm_eps=1e-6 if qk_norm else None, dtype=F32)
    slots = window or FULL_SLOTS
    spec = {"forward": {"x": nn.spec.Tensor(["n", HIDDEN], F32), "position": nn.spec.Int(),
                        "k_cache": nn.spec.Tensor([slots, KV_HEADS, head_dim], F32),
                        "v_cache": nn.spec.Tensor([slots, KV_HEADS, head_dim], F32), "$": PLAIN}}
    vm, names = _compile_block(ours, spec)
    weights = {"qkv_proj.weight": [hf.q_proj.weight, hf.k_proj.weight, hf.v_proj.weight],
               "o_proj.weight": hf.o_proj.weight}
    if bias:
        weights["qkv_proj.bias"] = [hf.q_proj.bias, hf.k_proj.bias, hf.v_proj.bias]
    if o_bias:
        weights["o_proj.bias"] = hf.o_proj.bias
    if qk_norm:
        weights |= {"q_norm.weight": hf.q_norm.weight, "k_norm.weight": hf.k_norm.weight}
    make_mask = create_causal_mask if window is None else create_sliding_window_causal_mask
    return hf, rotary_class(config), config, make_mask, window, slots, vm, _params(names, weights)


def _hf_attention_in_chunks(hf, rotary, config, make_mask, x: torch.Tensor, chunks: list[int]):
    """Run HF's attention as its model does, chunk after chunk over one DynamicCache. x [1, total, hidden]
    -> (out [total, hidden], k, v [total, kv, d] after RoPE)."""
    from transformers.cache_utils import DynamicCache

    cache, outs, lo = DynamicCache(), [], 0
    for size in chunks:
        chunk, positions = x[:, lo:lo + size], torch.arange(lo, lo + size)[None]
        mask = make_mask(config=config, inputs_embeds=chunk, attention_mask=None, past_key_values=cache,
                         position_ids=positions)  # [1, 1, size, lo + size]
        outs.append(hf(chunk, rotary(chunk, positions), mask, cache)[0][0])
        lo += size
    k, v = cache.layers[0].keys, cache.layers[0].values  # [1, kv, total, d]
    return torch.cat(outs), k[0].transpose(0, 1), v[0].transpose(0, 1)


CHUNKINGS = {"decode": [7, 1], "chunk": [7, 4], "chunk-over-window": [3, 9],
             "decode-past-window": [2] + [1] * 9, "chunks-wrap-ring": [4, 3, 4, 1]}


@pytest.mark.parametrize("chunks", list(CHUNKINGS.values()), ids=list(CHUNKINGS))
@torch.no_grad()
def test_attention_with_cache_matches_hf(attention_pair, chunks):
    """The same tokens through our block and HF's, chunk after chunk (window 5 on sliding layers: its
    edge falls inside the cache, inside a chunk longer than the window, and at every decode step past
    it). Our buffers start as garbage (NaN: masks are by position, no slot is read before it is
    written); every chunk's output must match HF's, and afterwards slot s must hold HF's key and value
    of the latest position congruent to s."""
    hf, rotary, config, make_mask, window, slots, vm, params = attention_pair
    total = sum(chunks)
    x = _randn(1, total, HIDDEN, seed=total + len(chunks))  # [1, total, hidden]
    hf_out, hf_k, hf_v = _hf_attention_in_chunks(hf, rotary, config, make_mask, x, chunks)
    head_dim = hf_k.shape[-1]
    k_cache, v_cache = (_tensor(np.full((slots, KV_HEADS, head_dim), np.nan)) for _ in range(2))
    outs, lo = [], 0
    for size in chunks:
        out, k_after, v_after = vm["forward"](_tensor(x[0, lo:lo + size]), tvm.runtime.ShapeTuple([lo]),
                                              k_cache, v_cache, *params)
        assert k_after.same_as(k_cache) and v_after.same_as(v_cache)  # written in place
        outs.append(out.numpy())
        lo += size
    assert max_rel_diff(np.concatenate(outs), hf_out.numpy()) <= CPU_TOLERANCE  # [total, hidden]
    filled = key_column_positions(total, 0, slots)  # the position each filled slot holds now
    for ours, ref in ((k_cache, hf_k), (v_cache, hf_v)):  # keys: projection, qk-norm, RoPE
        assert max_rel_diff(ours.numpy()[:filled.size], ref.numpy()[filled]) <= CPU_TOLERANCE
    if window is not None:  # the window must matter here, or this case tests only the causal mask
        from transformers.masking_utils import create_causal_mask

        full, _, _ = _hf_attention_in_chunks(hf, rotary, config, create_causal_mask, x, chunks)
        scale = np.abs(hf_out.numpy()).max()
        assert np.abs(full.numpy() - hf_out.numpy()).max() > 100 * CPU_TOLERANCE * scale


# --- SwiGLU and RMSNorm -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def swiglu_pair():
    """Our SwiGLU (gate and up fused on axis 0) and HF's Qwen2MLP, hidden 64, intermediate 96."""
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

    hf = _randomise(Qwen2MLP(Qwen2Config(hidden_size=64, intermediate_size=96)), seed=3)
    vm, names = _compile_block(layers.SwiGLU(64, 96, F32),
                               {"forward": {"x": nn.spec.Tensor(["n", 64], F32), "$": PLAIN}})
    weights = {"gate_up_proj.weight": [hf.gate_proj.weight, hf.up_proj.weight],  # [2 * 96, 64]
               "down_proj.weight": hf.down_proj.weight}  # [64, 96]
    return hf, vm, _params(names, weights)


@pytest.mark.parametrize("n", [1, 13])
@torch.no_grad()
def test_swiglu_matches_qwen2_mlp(swiglu_pair, n):
    hf, vm, params = swiglu_pair
    x = _randn(n, 64, seed=n)  # [n, hidden]
    ours = vm["forward"](_tensor(x), *params).numpy()
    assert max_rel_diff(ours, hf(x[None])[0].numpy()) <= CPU_TOLERANCE


@pytest.fixture(scope="module")
def rmsnorm_pair():
    """Our RMSNorm and HF's Qwen2RMSNorm over 64 features, eps 1e-6."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    hf = _randomise(Qwen2RMSNorm(64, eps=1e-6), seed=4)
    with torch.no_grad():
        hf.weight.add_(1.0)  # 1 + N(0, 0.15), as the other norms (its name is plain "weight")
    vm, names = _compile_block(layers.RMSNorm(64, 1e-6, F32),
                               {"forward": {"x": nn.spec.Tensor(["n", 64], F32), "$": PLAIN}})
    return hf, vm, _params(names, {"weight": hf.weight})


@torch.no_grad()
def test_rmsnorm_matches_qwen2_rmsnorm(rmsnorm_pair):
    hf, vm, params = rmsnorm_pair
    # [5, 64], row scales 1e-4 .. 1e3: in the first row eps (1e-6) outweighs mean(x^2) (~1e-8)
    x = _randn(5, 64, seed=5) * torch.tensor([1e-4, 1e-2, 1.0, 10.0, 1e3])[:, None]
    ours, ref = vm["forward"](_tensor(x), *params).numpy(), hf(x).numpy()
    assert max_rel_diff(ours, ref) <= CPU_TOLERANCE
    row_scale = np.abs(ref).max(axis=1)
    assert row_scale[0] < 0.2 * row_scale[2]  # eps visibly shrinks the tiny row: its placement is tested
    assert max_rel_diff(ours[0], ref[0]) <= CPU_TOLERANCE


# --- ViT / CLIP encoder block -----------------------------------------------------------------------

VIT_CASES = {"vit-gelu": ("vit", "gelu"), "clip-quick_gelu": ("clip", "quick_gelu"),
             "clip-gelu": ("clip", "gelu")}  # layout, hidden_act


@pytest.fixture(scope="module", params=list(VIT_CASES))
def encoder_pair(request, tmp_path_factory):
    """Our EncoderBlock and HF's ViTLayer / CLIPEncoderLayer (width 64, 4 heads, MLP 128). Our config is
    read from HF's by vit.config_from_hf; the weights come from the checkpoint HF's save_pretrained writes
    for a one-layer ViTModel / CLIPVisionModel, named by vit.weight_map (q/k/v fused on axis 0). (In
    memory transformers 5.x renames ViT's tensors; on disk they keep the names weight_map reads.)"""
    import transformers
    from safetensors.numpy import load_file
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer
    from transformers.models.vit.modeling_vit import ViTLayer

    layout, act = VIT_CASES[request.param]
    sizes = dict(hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=1,
                 image_size=32, patch_size=8, hidden_act=act)
    if layout == "vit":
        hf_config = transformers.ViTConfig(**sizes)
        model_class, layer_class = transformers.ViTModel, ViTLayer
    else:
        hf_config = transformers.CLIPVisionConfig(**sizes)
        model_class, layer_class = transformers.CLIPVisionModel, CLIPEncoderLayer
    hf_config._attn_implementation = "eager"
    model = _randomise(model_class(hf_config), seed=len(request.param))
    (hf,) = [m for m in model.modules() if isinstance(m, layer_class)]
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory)
    tensors = load_file(str(directory / "model.safetensors"))  # HF names on disk

    cfg = vit.ViTConfig(**vit.config_from_hf(hf_config.to_dict(), "test"))
    cfg.check("test")
    assert (cfg.weight_layout, cfg.hidden_act, cfg.layer_norm_eps) == (layout, act, hf_config.layer_norm_eps)
    vm, names = _compile_block(vit_graph.EncoderBlock(cfg, F32),
                               {"forward": {"x": nn.spec.Tensor(["b", "t", 64], F32), "$": PLAIN}})
    weights = {ours.removeprefix("blocks.0."): [torch.from_numpy(tensors[name]) for name in theirs]
               for ours, theirs in vit.weight_map(cfg).items() if ours.startswith("blocks.0.")}
    assert len(names) == len(list(hf.parameters())) - 4  # HF's q, k, v weights and biases: our fused qkv
    return hf, vm, _params(names, weights)


@torch.no_grad()
def test_encoder_block_matches_hf_layer(encoder_pair):
    hf, vm, params = encoder_pair
    x = _randn(2, 17, 64, seed=6)  # [batch 2, 1 + 16 patches, width]
    ref = hf(x, None)  # CLIPEncoderLayer's attention_mask is positional; None = all tokens see all
    ref = (ref[0] if isinstance(ref, tuple) else ref).numpy()
    assert max_rel_diff(vm["forward"](_tensor(x), *params).numpy(), ref) <= CPU_TOLERANCE


# --- Qwen3-MoE router and sparse block --------------------------------------------------------------

@pytest.fixture(scope="module", params=[True, False], ids=["norm_topk", "no_norm_topk"])
def block_pair(request):
    """Our SparseMoE and HF's Qwen3MoeSparseMoeBlock with the same random weights (8 experts, top-3)."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    hidden, ffn, experts, k = 32, 24, 8, 3
    config = Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=ffn, num_experts=experts,
                            num_experts_per_tok=k, norm_topk_prob=request.param)
    torch.manual_seed(0)
    hf = Qwen3MoeSparseMoeBlock(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.3)

    class Probe(nn.Module):
        def __init__(self):
            self.moe = layers.SparseMoE(hidden, ffn, experts, k, request.param, F32)

        def route(self, x):
            return self.moe.route(x)

        def forward(self, x):
            return self.moe(x)

    spec = {m: {"x": nn.spec.Tensor(["n", hidden], F32), "$": PLAIN} for m in ("route", "forward")}
    vm, names = _compile_block(Probe(), spec)
    weights = {"moe.gate.weight": hf.gate.weight, "moe.experts.gate_up_proj": hf.experts.gate_up_proj,
               "moe.experts.down_proj": hf.experts.down_proj}  # [8, 32], [8, 2*24, 32], [8, 32, 24]
    return hf, vm, _params(names, weights)


def test_router_picks_the_experts_hf_picks(block_pair):
    hf, vm, params = block_pair
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))  # [n, hidden]
    ours_w, ours_e = (t.numpy() for t in vm["route"](_tensor(x), *params))  # [n, k] each
    _, hf_w, hf_e = hf.gate(x)
    np.testing.assert_array_equal(ours_e, hf_e.numpy())  # same experts, same order (by probability)
    np.testing.assert_allclose(ours_w, hf_w.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_sparse_block_matches_hf(block_pair):
    hf, vm, params = block_pair
    for n in (1, 5, 64):  # decode-sized and prefill-sized batches of tokens
        x = torch.randn(n, 32, generator=torch.Generator().manual_seed(n))  # [n, hidden]
        ours = vm["forward"](_tensor(x), *params).numpy()
        expected = hf(x[None])[0].detach().numpy()
        assert max_rel_diff(ours, expected) <= CPU_TOLERANCE
