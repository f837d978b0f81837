"""LabConfig and LabDecoder: each switch is tested for the property that defines it, not only for running.

Positions: sinusoidal closed form and PE(p+k) = M_k PE(p); ALiBi slopes (8 and 12 heads, the paper's rule) and its
bias -m * distance; translation invariance of ALiBi / RoPE / NoPE models (and its absence with absolute positions);
RoPE scores depend on q - k only; NoPE's one-layer attention is blind to the order of the prefix; an ALiBi model
trained at 16 tokens keeps its loss at 64 while a learned-position one does not. Norms: LayerNorm rows have zero
mean and unit variance, RMSNorm rows unit RMS; pre / post / DeepNorm placement by what a block computes when its
sublayers output zero; DeepNorm's alpha and init gains. MLPs: formulas, ReLU^2, equal parameters under the 2/3
rule. Every configuration: trains, cached decoding (left-padded batches) equals recomputation, fused loss, generate.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.common import LmforgeError
from lmforge.infer.generate import generate
from lmforge.infer.kv_cache import KVCache
from lmforge.infer.sampling import SamplingParams
from lmforge.model import lab
from lmforge.model.config import LlamaConfig
from lmforge.model.config import flops_per_token as llama_flops
from lmforge.model.config import n_params as llama_params
from lmforge.model.decoder import Llama
from lmforge.model.lab import LabBlock, LabConfig, LabDecoder
from lmforge.model.layers import SwiGLU, apply_rotary, rope_tables

pytestmark = pytest.mark.usefixtures("one_thread")

V = 61


def tiny(**kw) -> LabConfig:
    return LabConfig(**{"vocab_size": V, "dim": 48, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 64,
                        **kw})


def model_of(seed: int = 0, **kw) -> LabDecoder:
    torch.manual_seed(seed)
    return LabDecoder(tiny(**kw)).eval()


# Every value of every switch, several times: positions x placements, with norms and MLPs cycled through.
CONFIGS = [dict(position=p, placement=pl, norm=lab.NORMS[i % 2], mlp=lab.MLPS[i % 4], tie_embeddings=i % 3 == 0)
           for i, (p, pl) in enumerate((p, pl) for p in lab.POSITIONS for pl in lab.PLACEMENTS)]
IDS = ["-".join(str(v) for k, v in c.items() if k != "tie_embeddings") for c in CONFIGS]


# ---- config ----


def test_config_dict_roundtrip_and_errors():
    cfg = tiny(position="alibi", norm="layernorm", placement="deepnorm", mlp="relu2", eos_token_id=3)
    assert LabConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(LmforgeError, match="unknown LabConfig keys: posiiton"):
        LabConfig.from_dict({**cfg.to_dict(), "posiiton": "rope"})
    with pytest.raises(LmforgeError, match="missing required keys: n_heads"):
        LabConfig.from_dict({"vocab_size": 8, "dim": 8, "n_layers": 1})
    for bad, match in [(dict(position="xpos"), "position must be one of"), (dict(mlp="swish"), "mlp must be one of"),
                       (dict(placement="sandwich"), "placement"), (dict(norm="batchnorm"), "norm"),
                       (dict(dim=45, n_heads=5, n_kv_heads=5), "even for rotary"),
                       (dict(dim=45, n_heads=5, n_kv_heads=5, position="sinusoidal"), "even for sinusoidal"),
                       (dict(n_kv_heads=3), "divisible by n_kv_heads"), (dict(ffn_dim=0), "ffn_dim")]:
        with pytest.raises(LmforgeError, match=match):
            tiny(**bad)
    assert tiny(dim=45, n_heads=5, n_kv_heads=5, position="alibi").head_dim == 9  # odd head_dim is fine without RoPE
    d = LabConfig.from_depth(2, vocab_size=100, position="none")
    assert (d.dim, d.n_layers, d.n_heads, d.head_dim, d.ffn_dim, d.position) == (128, 2, 2, 64, 512, "none")


def test_param_count_formula_and_llama_equivalence():
    """n_params equals the built model's count for every config, and the default switches are Llama exactly: the
    same parameters, FLOPs and (with Llama's weights copied in) the same logits."""
    for kw in CONFIGS:
        cfg = tiny(**kw)
        assert lab.n_params(cfg) == sum(p.numel() for p in LabDecoder(cfg).parameters()), kw
    cfg = tiny(ffn_dim=192)  # hidden 128 = Llama's ffn for dim 48
    llama_cfg = LlamaConfig(vocab_size=V, dim=48, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=64)
    assert cfg.hidden_dim == 128 and lab.n_params(cfg) == llama_params(llama_cfg)
    assert lab.flops_per_token(cfg, 64) == llama_flops(llama_cfg, 64)
    torch.manual_seed(0)
    ref = Llama(llama_cfg).eval()
    renames = {"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm"}
    state = {}
    for name, t in ref.state_dict().items():
        for old, new in renames.items():
            name = name.replace(old, new)
        state[name] = t
    model = LabDecoder(cfg).eval()
    model.load_state_dict(state)
    idx = torch.randint(0, V, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), ref(idx), rtol=0, atol=1e-5)


# ---- positions ----


def test_sinusoidal_matches_closed_form():
    """PE(p, 2i) = sin(p / 10000^(2i/d)), PE(p, 2i+1) = cos(p / 10000^(2i/d)) (Vaswani et al. 2017, 3.5)."""
    d = 16
    pe = lab.sinusoidal_table(100, d)
    assert pe.shape == (100, d) and pe.dtype == torch.float32
    for p in (0, 1, 7, 99):
        for i in range(d // 2):
            w = 10000 ** (-2 * i / d)
            assert pe[p, 2 * i].item() == pytest.approx(math.sin(p * w), abs=1e-6)
            assert pe[p, 2 * i + 1].item() == pytest.approx(math.cos(p * w), abs=1e-6)


def test_sinusoidal_offset_is_a_linear_map():
    """PE(p + k) = M_k PE(p) with M_k block-diagonal rotations [[cos wk, sin wk], [-sin wk, cos wk]] that depend on
    the offset k only, the same for every p."""
    d, k = 16, 5
    pe = lab.sinusoidal_table(64, d).double()
    w = 10000 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    c, s = torch.cos(w * k), torch.sin(w * k)
    M = torch.block_diag(*[torch.tensor([[ci, si], [-si, ci]]) for ci, si in zip(c, s)])  # (d, d), no p in it
    for p in (0, 3, 20, 58):
        torch.testing.assert_close(M @ pe[p], pe[p + k], rtol=0, atol=1e-6)
    # the map is not a shift of the table's values for another offset
    assert not torch.allclose(M @ pe[3], pe[3 + k + 1], atol=1e-3)


def _press_get_slopes(n: int) -> list[float]:
    """The ALiBi authors' reference (ofirpress/attention_with_linear_biases, fairseq models/transformer.py)."""
    def get_slopes_power_of_2(n):
        start = 2 ** (-2 ** -(math.log2(n) - 3))
        ratio = start
        return [start * ratio**i for i in range(n)]

    if math.log2(n).is_integer():
        return get_slopes_power_of_2(n)
    closest_power_of_2 = 2 ** math.floor(math.log2(n))
    return (get_slopes_power_of_2(closest_power_of_2)
            + _press_get_slopes(2 * closest_power_of_2)[0::2][: n - closest_power_of_2])


def test_alibi_slopes_are_the_papers():
    assert lab.alibi_slopes(8).tolist() == [2.0**-i for i in range(1, 9)]  # 1/2, 1/4, ..., 1/256
    twelve = [2.0**-i for i in range(1, 9)] + [2**-0.5, 2**-1.5, 2**-2.5, 2**-3.5]  # the non-power-of-two rule
    torch.testing.assert_close(lab.alibi_slopes(12), torch.tensor(twelve), rtol=1e-7, atol=0)
    for n in (1, 2, 4, 6, 8, 12, 16, 20, 32):
        torch.testing.assert_close(lab.alibi_slopes(n), torch.tensor(_press_get_slopes(n), dtype=torch.float32))
        if n & (n - 1) == 0:
            torch.testing.assert_close(lab.alibi_slopes(n), torch.tensor([2 ** (-8 * i / n) for i in range(1, n + 1)]))


def test_alibi_bias_is_minus_slope_times_distance():
    slopes = lab.alibi_slopes(4)
    pos = torch.arange(6)
    b = lab.alibi_bias(slopes, pos, pos)  # (H, T, T)
    for h in range(4):
        for i in range(6):
            for j in range(i + 1):
                assert b[h, i, j].item() == pytest.approx(-slopes[h].item() * (i - j))
    model = model_of(position="alibi")  # the model's bias: the same numbers, -inf above the diagonal
    bias = model._alibi(pos, None)  # (1, H, T, T)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    assert torch.equal(bias[0][:, causal], b[:, causal]) and bias[0][:, ~causal].eq(float("-inf")).all()


@pytest.mark.parametrize("position, invariant", [("alibi", True), ("rope", True), ("none", True),
                                                 ("sinusoidal", False), ("learned", False)])
def test_translation_invariance(position, invariant):
    """Relative schemes give the same logits when every position shifts by 9 (uncached, and through a KV cache that
    starts at slot 9); absolute ones do not."""
    model = model_of(position=position)
    idx = torch.randint(0, V, (2, 12))
    pos = torch.arange(12).expand(2, 12)
    with torch.no_grad():
        base = model(idx)
        shifted = model(idx, input_pos=pos + 9)
        cached = model(idx, input_pos=pos + 9, cache=KVCache(model.cfg, 2, 32))
    assert torch.allclose(base, shifted, atol=2e-5) == invariant
    assert torch.allclose(base, cached, atol=2e-5) == invariant


def test_rope_scores_depend_only_on_relative_position():
    """<R_m q, R_n k> is a function of m - n: equal for (3, 1), (10, 8), (40, 38), different for (10, 7)."""
    cos, sin = rope_tables(64, 16, 10000.0)
    torch.manual_seed(0)
    q, k = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)

    def score(m: int, n: int) -> float:
        qm = apply_rotary(q[None], cos[m, None].double(), sin[m, None].double())
        kn = apply_rotary(k[None], cos[n, None].double(), sin[n, None].double())
        return (qm * kn).sum().item()

    assert score(3, 1) == pytest.approx(score(10, 8), abs=1e-5) == pytest.approx(score(40, 38), abs=1e-5)
    assert score(10, 7) != pytest.approx(score(10, 8), abs=1e-3)


def test_nope_first_layer_is_blind_to_prefix_order():
    """Without positions, one causal attention layer sees the tokens before the last one as a set: permuting them
    leaves the last position's logits unchanged. With RoPE the order matters. NoPE has no position tensors."""
    idx = torch.randint(0, V, (1, 10))
    perm = torch.cat([torch.randperm(9), torch.tensor([9])])
    for position, blind in (("none", True), ("rope", False)):
        model = model_of(position=position, n_layers=1)
        with torch.no_grad():
            a, b = model(idx)[0, -1], model(idx[:, perm])[0, -1]
        assert torch.allclose(a, b, atol=1e-5) == blind, position
    nope = model_of(position="none")
    assert not list(nope.buffers()) and not any("pos" in n for n, _ in nope.named_parameters())


def _recurrence_batch(B: int, T: int, table: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """x[i] = table[x[i-2], x[i-1]]: a rule of the last two tokens, the same at every position."""
    x = torch.empty(B, T + 1, dtype=torch.long)
    x[:, :2] = torch.randint(0, table.shape[0], (B, 2), generator=g)
    for i in range(2, T + 1):
        x[:, i] = table[x[:, i - 2], x[:, i - 1]]
    return x


def _loss_in_and_beyond(position: str, seed: int = 0) -> tuple[float, float]:
    """Train at 16 tokens, evaluate at 64: mean loss over positions 2..15 and over 16..63."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    table = torch.randint(0, 16, (16, 16), generator=g)
    model = LabDecoder(LabConfig(vocab_size=16, dim=32, n_layers=2, n_heads=4, max_seq_len=64, position=position))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        x = _recurrence_batch(16, 16, table, g)
        loss = model(x[:, :-1], targets=x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    x = _recurrence_batch(32, 64, table, g)
    with torch.no_grad():
        nll = F.cross_entropy(model(x[:, :-1]).transpose(1, 2), x[:, 1:], reduction="none").mean(0)  # (64,)
    return nll[2:16].mean().item(), nll[16:].mean().item()


def test_alibi_extrapolates_beyond_training_length():
    """Press et al. 2022's claim in miniature: trained on 16 tokens, the ALiBi model's loss at positions 16..63 is no
    worse than within the training length; learned absolute positions (never trained past 15) get worse."""
    inside, beyond = _loss_in_and_beyond("alibi")
    assert inside < 1.0 and beyond <= inside + 0.05, (inside, beyond)
    inside, beyond = _loss_in_and_beyond("learned")
    assert beyond > inside + 0.15, (inside, beyond)


def test_positions_beyond_max_seq_len_are_refused():
    model = model_of(position="learned")
    with pytest.raises(LmforgeError, match="exceeds max_seq_len 64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(LmforgeError, match="position 64 exceeds"):
        model(torch.zeros(1, 1, dtype=torch.long), input_pos=torch.tensor([[64]]))


# ---- norms and placement ----


def test_layernorm_rows_have_zero_mean_unit_variance_rmsnorm_unit_rms():
    x = 3.0 + 2.0 * torch.randn(5, 7, 64)
    y = lab.make_norm("layernorm", 64, 1e-6)(x)
    torch.testing.assert_close(y.mean(-1), torch.zeros(5, 7), rtol=0, atol=1e-5)
    torch.testing.assert_close(y.var(-1, unbiased=False), torch.ones(5, 7), rtol=0, atol=1e-4)
    z = lab.make_norm("rmsnorm", 64, 1e-6)(x)
    torch.testing.assert_close(z.pow(2).mean(-1).sqrt(), torch.ones(5, 7), rtol=0, atol=1e-5)
    assert z.mean(-1).abs().min() > 0.5  # RMSNorm does not center: the rows keep their (large) mean


def _silenced_block(placement: str, norm: str = "layernorm") -> LabBlock:
    """A block whose sublayers output zero (o_proj and down_proj zeroed), so only residual and norms remain."""
    torch.manual_seed(0)
    block = LabDecoder(tiny(placement=placement, norm=norm, n_layers=3, position="none")).layers[0]
    with torch.no_grad():
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()
        for p in (block.attn_norm.weight, block.mlp_norm.weight):
            p.uniform_(0.5, 1.5)  # non-trivial norm weights, so a missing or extra norm shows
    return block


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_norm_placement(norm):
    """With f = 0: pre-norm is the identity (the residual stream bypasses the norms), post-norm is
    norm2(norm1(x)), DeepNorm norm2(alpha * norm1(alpha * x))."""
    x = 2.0 + 3.0 * torch.randn(2, 5, 48)
    with torch.no_grad():
        assert torch.equal(_silenced_block("pre", norm)(x, None, None), x)
        b = _silenced_block("post", norm)
        torch.testing.assert_close(b(x, None, None), b.mlp_norm(b.attn_norm(x)))
        b = _silenced_block("deepnorm", norm)
        a = lab.deepnorm_alpha(3)
        torch.testing.assert_close(b(x, None, None), b.mlp_norm(a * b.attn_norm(a * x)))


def test_post_norm_outputs_are_normalized_pre_norm_are_not():
    """Post-norm rows leave every block (and reach the head) normalized, so post-norm models have no final norm;
    pre-norm blocks return the raw residual stream and the model adds the final norm."""
    x = 2.0 + 3.0 * torch.randn(2, 5, 48)
    for placement in ("post", "deepnorm"):
        model = model_of(placement=placement, norm="layernorm", position="none")
        with torch.no_grad():
            y = model.layers[0](x, None, None)
        torch.testing.assert_close(y.mean(-1), torch.zeros(2, 5), rtol=0, atol=1e-5)
        torch.testing.assert_close(y.var(-1, unbiased=False), torch.ones(2, 5), rtol=0, atol=1e-3)
        assert isinstance(model.norm, torch.nn.Identity)
    model = model_of(placement="pre", norm="layernorm", position="none")
    with torch.no_grad():
        y = model.layers[0](x, None, None)
    assert y.var(-1).min() > 4.0 and isinstance(model.norm, torch.nn.LayerNorm)  # x's rows have variance ~9


def test_deepnorm_constants_and_init():
    """alpha = (2N)^(1/4) on the residual; Xavier-normal init with gain beta = (8N)^(-1/4) for v, o and the MLP,
    gain 1 for q and k (Wang et al. 2022, figure 2 and table 1, decoder-only)."""
    N = 6
    assert lab.deepnorm_alpha(N) == pytest.approx(12**0.25) and lab.deepnorm_beta(N) == pytest.approx(48**-0.25)
    torch.manual_seed(0)
    model = LabDecoder(LabConfig(vocab_size=V, dim=128, n_layers=N, n_heads=4, mlp="gelu", placement="deepnorm"))
    assert all(b.alpha == pytest.approx(12**0.25) for b in model.layers)
    assert model_of(placement="post").layers[0].alpha == 1.0

    def pooled_std_ratio(names: list[str]) -> float:
        """std of the named weights over all layers, divided by Xavier's sqrt(2 / (fan_in + fan_out))."""
        ws = [dict(b.named_parameters())[n] for b in model.layers for n in names]
        xavier = math.sqrt(2 / sum(ws[0].shape))
        return torch.cat([w.flatten() for w in ws]).std().item() / xavier

    beta = lab.deepnorm_beta(N)
    for names, gain in ((["self_attn.q_proj.weight", "self_attn.k_proj.weight"], 1.0),
                        (["self_attn.v_proj.weight", "self_attn.o_proj.weight"], beta),
                        (["mlp.up_proj.weight"], beta), (["mlp.down_proj.weight"], beta)):
        assert pooled_std_ratio(names) == pytest.approx(gain, rel=0.03), names


# ---- MLPs ----


def test_mlp_formulas():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 48)
    assert torch.equal(lab.relu_squared(torch.tensor([-2.0, 0.0, 3.0])), torch.tensor([0.0, 0.0, 9.0]))
    with torch.no_grad():
        for kind, act in (("relu2", lambda h: F.relu(h) ** 2), ("gelu", F.gelu)):
            m = lab.MLP(48, 64, kind)
            torch.testing.assert_close(m(x), m.down_proj(act(m.up_proj(x))))
        g = lab.GeGLU(48, 64)
        torch.testing.assert_close(g(x), g.down_proj(F.gelu(g.gate_proj(x)) * g.up_proj(x)))
    assert type(lab.make_mlp(tiny(mlp="swiglu"))) is SwiGLU  # layers.SwiGLU itself, reused


def test_gated_mlps_match_ungated_parameter_counts():
    """The 2/3 width rule: gated MLPs (three matrices) have the parameters of ungated ones (two) at the same dim;
    exactly when 3 divides ffn_dim, else within one row of dim weights."""
    for dim, ffn in ((48, None), (96, 240), (64, None), (40, 100)):
        counts = {kind: sum(p.numel() for p in lab.make_mlp(tiny(dim=dim, ffn_dim=ffn, mlp=kind)).parameters())
                  for kind in lab.MLPS}
        ffn = ffn or 4 * dim
        assert counts["gelu"] == counts["relu2"] == 2 * dim * ffn
        assert counts["swiglu"] == counts["geglu"]
        assert abs(counts["swiglu"] - counts["gelu"]) <= (0 if ffn % 3 == 0 else dim), (dim, ffn, counts)


# ---- every configuration ----


@pytest.mark.parametrize("kw", CONFIGS, ids=IDS)
def test_every_config_trains_and_gives_the_fused_loss(kw):
    model = model_of(**kw).train()
    x = torch.randint(0, V, (4, 17))
    idx, y = x[:, :-1], x[:, 1:]
    with torch.no_grad():
        ref = F.cross_entropy(model(idx).flatten(0, 1), y.flatten())
    first = model(idx, targets=y)
    torch.testing.assert_close(first, ref, rtol=1e-5, atol=1e-6)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(8):
        loss = model(idx, targets=y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.85 * first.item(), (first.item(), loss.item())


@pytest.mark.parametrize("kw", CONFIGS, ids=IDS)
def test_every_config_cached_decoding_equals_recomputation(kw):
    """Two prompts of lengths 5 and 9, left-padded into one batch, prefilled and then decoded 4 steps through the
    KV cache: each row's logits equal a plain forward over that row's tokens alone."""
    model = model_of(**kw)
    rows = [torch.randint(0, V, (13,)), torch.randint(0, V, (13,))]
    lengths = [5, 9]
    T = max(lengths)
    ids = torch.zeros(2, T, dtype=torch.long)
    pos = torch.full((2, T), -1)
    for b, n in enumerate(lengths):
        ids[b, T - n:], pos[b, T - n:] = rows[b][:n], torch.arange(n)
    cache = KVCache(model.cfg, 2, 16)
    with torch.no_grad():
        steps = [model(ids, input_pos=pos, cache=cache)[:, -1]]
        for i in range(4):
            nxt = torch.stack([rows[b][lengths[b] + i] for b in range(2)])[:, None]
            steps.append(model(nxt, input_pos=pos[:, -1:] + 1 + i, cache=cache)[:, -1])
        for b, n in enumerate(lengths):
            full = model(rows[b][None, : n + 4])[0, n - 1:]  # logits after each of the last 5 tokens
            torch.testing.assert_close(torch.stack([s[b] for s in steps]), full, rtol=0, atol=2e-5)


@pytest.mark.parametrize("position", ["alibi", "sinusoidal"])
def test_generate_equals_greedy_recomputation(position):
    model = model_of(position=position, placement="post", norm="layernorm")
    prompt = [3, 1, 4, 1, 5]
    new = list(generate(model, prompt, SamplingParams(temperature=0, max_new_tokens=6)))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert new == ids[len(prompt):]


def test_rebuild_on_meta_and_after_bf16_cast():
    """What a loader does: build on the meta device, assign the saved tensors, recompute the derived tables. And a
    bfloat16 cast gets its RoPE / sinusoid / slope tables rebuilt in fp32 at the next forward."""
    for position in ("rope", "sinusoidal", "alibi"):
        model = model_of(position=position)
        idx = torch.randint(0, V, (2, 10))
        with torch.no_grad():
            ref = model(idx)
        with torch.device("meta"):
            loaded = LabDecoder(LabConfig.from_dict(model.cfg.to_dict()))
        loaded.load_state_dict(model.state_dict(), assign=True)
        loaded.reset_buffers("cpu")
        assert set(model.state_dict()) == set(loaded.state_dict()) and not any(
            n in model.state_dict() for n in lab.DERIVED)
        with torch.no_grad():
            assert torch.equal(loaded.eval()(idx), ref)
            model.to(torch.bfloat16)(idx)
        assert all(b.dtype == torch.float32 for b in model.buffers())
