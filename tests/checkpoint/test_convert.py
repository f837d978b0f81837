"""`lmforge convert`: GGUF and HF directories -> run directories, against transformers' own GGUF loader.

Small llama GGUFs are written here the way llama.cpp's converter writes them (names, q/k row permutation,
tokenizer metadata) from a random lmforge Llama, so the converted run can be compared with the model it came
from exactly, and with what transformers loads from the same file. The real SmolLM2-135M-Instruct Q4_1 GGUF,
when installed, is converted once per module and compared with transformers' load of it: weights, logits,
greedy generation, tokenization (those comparisons load the model in transformers: marked slow).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.checkpoint import convert as conv
from lmforge.checkpoint import load_run, load_tensors, read_meta, save_run
from lmforge.checkpoint.hf import to_hf_state_dict
from lmforge.common import LmforgeError
from lmforge.infer.generate import generate
from lmforge.infer.sampling import SamplingParams
from lmforge.model import Llama, LlamaConfig
from lmforge.tokenizer import load_tokenizer, tokenizer_json, train_bpe

from .test_gguf import smollm2_path, write_gguf

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf import GGUFValueType as V  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
TEXTS = ["Hello world!", "  two  spaces and\ttabs\n\nnew lines", "numbers 12345 and 3.14159", "naïve café 日本語 🤖",
         "def f(x):\n    return x ** 2  # code", "don't won't they're I'll", "<|im_start|>user\nhi<|im_end|>"]

# HF name -> GGUF name, as llama.cpp's tensor_mapping.py writes a llama
GGUF_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}
GGUF_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def gguf_name(hf: str) -> str:
    if hf in GGUF_GLOBAL:
        return GGUF_GLOBAL[hf]
    _, _, i, rest = hf.split(".", 3)
    return f"blk.{i}.{GGUF_LAYER[rest.removesuffix('.weight')]}.weight"


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py `LlamaModel.permute`: each head's two rotary halves interleaved row by row."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus") / "c.txt"
    corpus.write_text(" ".join(TEXTS) * 30 + " the quick brown fox jumps over the lazy dog 2024 " * 40)
    return train_bpe([corpus], vocab_size=330, pattern="gpt2", special_tokens=SPECIALS)


def tiny_model(vocab: int, tied: bool = True, **kw) -> tuple[Llama, LlamaConfig]:
    cfg = LlamaConfig(**{"vocab_size": vocab, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 128,
                         "max_seq_len": 64, "rope_theta": 10000.0, "norm_eps": 1e-5, "tie_embeddings": tied, **kw})
    torch.manual_seed(0)
    model = Llama(cfg)
    with torch.no_grad():  # norms away from 1 so a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.eval(), cfg


def gguf_tokens(tok) -> list[str]:
    """The vocabulary in GPT-2's byte spelling, special tokens first (ids 0..2, as in SmolLM2): the GGUF's ids."""
    doc = tokenizer_json(tok)
    ordinary = sorted((t for t in doc["model"]["vocab"] if t not in tok.special_tokens), key=doc["model"]["vocab"].get)
    return SPECIALS + ordinary


def tokenizer_metadata(tok, pre: str = "gpt-2", bos: str | None = "<|im_start|>", eos: str = "<|im_end|>",
                       add_bos: bool | None = False, template: str | None = TEMPLATE) -> list[tuple]:
    """tokenizer.ggml.* as llama.cpp's converter writes a byte-level BPE tokenizer."""
    tokens = gguf_tokens(tok)
    types = [3 if t in SPECIALS else 1 for t in tokens]
    meta = [("tokenizer.ggml.model", "gpt2", V.STRING, None), ("tokenizer.ggml.pre", pre, V.STRING, None),
            ("tokenizer.ggml.tokens", tokens, V.ARRAY, V.STRING),
            ("tokenizer.ggml.token_type", types, V.ARRAY, V.INT32),
            ("tokenizer.ggml.merges", tokenizer_json(tok)["model"]["merges"], V.ARRAY, V.STRING),
            ("tokenizer.ggml.eos_token_id", tokens.index(eos), V.UINT32, None),
            ("tokenizer.ggml.padding_token_id", tokens.index(eos), V.UINT32, None)]
    if bos is not None:
        meta.append(("tokenizer.ggml.bos_token_id", tokens.index(bos), V.UINT32, None))
    if add_bos is not None:
        meta.append(("tokenizer.ggml.add_bos_token", add_bos, V.BOOL, None))
    if template is not None:
        meta.append(("tokenizer.chat_template", template, V.STRING, None))
    return meta


def llama_gguf(path: Path, model: Llama, cfg: LlamaConfig, tok, qtype: Q | None = None, tokenizer=None,
               extra_tensors=None, extra_meta=(), arch: str = "llama") -> Path:
    """A llama GGUF of `model` as llama.cpp writes one: GGUF names, q/k permuted, 2-D weights in `qtype`."""
    meta = [(f"{arch}.vocab_size", cfg.vocab_size, V.UINT32, None),
            (f"{arch}.context_length", cfg.max_seq_len, V.UINT32, None),
            (f"{arch}.embedding_length", cfg.dim, V.UINT32, None),
            (f"{arch}.block_count", cfg.n_layers, V.UINT32, None),
            (f"{arch}.feed_forward_length", cfg.ffn_dim, V.UINT32, None),
            (f"{arch}.rope.dimension_count", cfg.head_dim, V.UINT32, None),
            (f"{arch}.attention.head_count", cfg.n_heads, V.UINT32, None),
            (f"{arch}.attention.head_count_kv", cfg.n_kv_heads, V.UINT32, None),
            (f"{arch}.attention.layer_norm_rms_epsilon", cfg.norm_eps, V.FLOAT32, None),
            (f"{arch}.rope.freq_base", cfg.rope_theta, V.FLOAT32, None),
            *(tokenizer if tokenizer is not None else tokenizer_metadata(tok)), *extra_meta]
    tensors = {}
    for hf, t in to_hf_state_dict(model.state_dict(), cfg.tie_embeddings).items():
        w = t.detach().numpy()
        if ".q_proj." in hf or ".k_proj." in hf:
            w = llama_cpp_permute(w, cfg.n_heads if ".q_proj." in hf else cfg.n_kv_heads)
        stored = (gguf.quants.quantize(w, qtype), qtype) if qtype is not None and w.ndim == 2 else (w, None)
        tensors[gguf_name(hf)] = stored
    tensors.update(extra_tensors or {})
    return write_gguf(path, tensors, meta, arch=arch)


def transformers_from_gguf(path: Path) -> torch.nn.Module:
    """transformers' own load of a llama GGUF, in float32.

    `from_pretrained(dir, gguf_file=name)` insists on `accelerate`; where it is missing, run the loader that
    from_pretrained calls for a llama GGUF (`load_gguf_checkpoint`: gguf-py dequantization, q/k unpermuted).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

    if importlib.util.find_spec("accelerate") is not None:
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    model = LlamaForCausalLM(config)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"} and (not missing or config.tie_word_embeddings)
    model.tie_weights()
    return model.eval()


def convert_quietly(src, out, **kw) -> Path:
    """convert(), checking that it gave no warning about the tokenizer (these vocabularies are complete)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = conv.convert(src, out, progress=False, **kw)
    assert not [w for w in caught if "tokenizer" in str(w.message)]
    return run


# ---- small GGUFs ----


@pytest.mark.parametrize("tied", [True, False])
def test_float32_gguf_converts_to_the_model_it_came_from(tmp_path, tok, tied):
    model, cfg = tiny_model(tok.vocab_size, tied)
    run = convert_quietly(llama_gguf(tmp_path / "m.gguf", model, cfg, tok), tmp_path / "run")
    loaded, cfg2 = load_run(run)
    assert cfg2 == LlamaConfig(**{**cfg.to_dict(), "eos_token_id": gguf_tokens(tok).index("<|im_end|>")})
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    assert ("lm_head.weight" in load_tensors(run)) is not tied
    idx = torch.randint(0, cfg.vocab_size, (2, 11))
    torch.testing.assert_close(loaded(idx), model(idx), rtol=0, atol=0)


def test_quantized_gguf_matches_transformers_gguf_load(tmp_path, tok):
    """Q8_0 weights: the converted run holds exactly what transformers dequantizes and unpermutes."""
    model, cfg = tiny_model(tok.vocab_size, tied=False)
    (tmp_path / "g").mkdir()  # transformers reads a GGUF from a directory
    path = llama_gguf(tmp_path / "g" / "m.gguf", model, cfg, tok, qtype=Q.Q8_0)
    run = convert_quietly(path, tmp_path / "run")
    ref = transformers_from_gguf(path)
    ours = load_tensors(run)
    ref_state = ref.state_dict()
    assert set(ours) == set(ref_state)
    for name, t in ours.items():
        assert torch.equal(t, ref_state[name]), name
    loaded, _ = load_run(run)
    idx = torch.randint(0, cfg.vocab_size, (1, 13))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), ref(idx).logits, rtol=0, atol=1e-5)
        assert (loaded(idx) - model(idx)).abs().max() < 0.1  # Q8_0 of the original, roughly


def test_run_loads_in_transformers_and_tokenizes_like_its_gguf_loader(tmp_path, tok):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, cfg = tiny_model(tok.vocab_size)
    path = tmp_path / "g" / "m.gguf"
    path.parent.mkdir()
    run = convert_quietly(llama_gguf(path, model, cfg, tok), tmp_path / "run")
    hf = AutoModelForCausalLM.from_pretrained(run, dtype=torch.float32).eval()
    idx = torch.randint(0, cfg.vocab_size, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), rtol=0, atol=2e-5)
    ref_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    run_tok = AutoTokenizer.from_pretrained(run)
    ours = load_tokenizer(run)
    for text in TEXTS:
        expected = ref_tok(text, add_special_tokens=False).input_ids
        assert run_tok(text).input_ids == expected, text
        assert ours.encode(text, allowed_special="all") == expected, text
    assert ours.encode("<|im_end|>", allowed_special="all") == [2]
    assert run_tok("<|im_start|>hi").input_ids == ref_tok("<|im_start|>hi").input_ids == [1, *ours.encode("hi")]


def test_tokenizer_files_and_chat_template(tmp_path, tok):
    from transformers import AutoTokenizer

    model, cfg = tiny_model(tok.vocab_size)
    run = convert_quietly(llama_gguf(tmp_path / "m.gguf", model, cfg, tok), tmp_path / "run")
    assert sorted(os.listdir(run)) == ["chat_template.jinja", "config.json", "lmforge.json", "model.safetensors",
                                       "tokenizer.json", "tokenizer_config.json"]
    assert (run / "chat_template.jinja").read_text() == TEMPLATE
    config = json.loads((run / "tokenizer_config.json").read_text())
    assert config["chat_template"] == TEMPLATE and config["add_bos_token"] is False
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == ("<|im_start|>", "<|im_end|>",
                                                                               "<|im_end|>")
    hf = AutoTokenizer.from_pretrained(run)
    messages = [{"role": "user", "content": "hi"}]
    assert hf.apply_chat_template(messages, tokenize=False) == "<|im_start|>user\nhi<|im_end|>\n"
    meta = read_meta(run)
    assert meta["stage"] == "convert" and meta["source"]["format"] == "gguf"
    assert meta["source"]["tensor_types"] == {"F32": len(load_tensors(run))}


def test_gguf_without_tokenizer_converts_with_a_warning(tmp_path, tok):
    model, cfg = tiny_model(tok.vocab_size)
    path = llama_gguf(tmp_path / "m.gguf", model, cfg, tok, tokenizer=[])
    with pytest.warns(UserWarning, match="no tokenizer metadata"):
        run = conv.convert(path, tmp_path / "run", progress=False)
    assert sorted(os.listdir(run)) == ["config.json", "lmforge.json", "model.safetensors"]
    assert load_run(run)[1].eos_token_id is None


def test_digits_split_one_by_one_for_smollm_pre_tokenizer(tmp_path, tok):
    """tokenizer.ggml.pre 'smollm' (llama.cpp: "\\p{N}" then GPT-2's split) = HF's Digits(individual) + ByteLevel."""
    from tokenizers import Tokenizer, pre_tokenizers

    model, cfg = tiny_model(tok.vocab_size)
    path = llama_gguf(tmp_path / "m.gguf", model, cfg, tok, tokenizer=tokenizer_metadata(tok, pre="smollm"))
    run = convert_quietly(path, tmp_path / "run")
    ours = Tokenizer.from_file(str(run / "tokenizer.json"))
    reference = Tokenizer.from_file(str(run / "tokenizer.json"))
    reference.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    lm = load_tokenizer(run)
    for text in [*TEXTS, "x  1", "a\n\n42\n", "2024-11-22   07:30", " 9 ", "１２３ ٣"]:
        assert ours.encode(text).ids == reference.encode(text).ids, text
        assert lm.encode(text, allowed_special="all") == reference.encode(text).ids, text


def test_llama3_style_gguf_bos_and_rope_scaling(tmp_path, tok):
    """pre 'llama-bpe' adds BOS by default; rope_freqs.weight is read back into Llama 3 rope_scaling."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    scaling = conv.KNOWN_LLAMA3_ROPE[1]
    model, cfg = tiny_model(tok.vocab_size, rope_theta=500000.0, rope_scaling=scaling, max_seq_len=64)
    factors = conv.llama3_rope_factors(scaling, cfg.rope_theta, cfg.head_dim).numpy()
    meta = tokenizer_metadata(tok, pre="llama-bpe", bos="<|endoftext|>", add_bos=None)
    path = llama_gguf(tmp_path / "m.gguf", model, cfg, tok, tokenizer=meta,
                      extra_tensors={"rope_freqs.weight": (factors, None)})
    run = convert_quietly(path, tmp_path / "run")
    loaded, cfg2 = load_run(run)
    bos = gguf_tokens(tok).index("<|endoftext|>")
    assert cfg2.rope_scaling == scaling and cfg2.bos_token_id == bos
    idx = torch.randint(0, cfg.vocab_size, (1, 40))
    hf = AutoModelForCausalLM.from_pretrained(run, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), model(idx), rtol=0, atol=0)
        torch.testing.assert_close(hf(idx).logits, model(idx), rtol=0, atol=2e-5)
    body = load_tokenizer(run).encode("hello world")
    assert Tokenizer.from_file(str(run / "tokenizer.json")).encode("hello world").ids == [bos, *body]
    assert AutoTokenizer.from_pretrained(run)("hello world").input_ids == [bos, *body]
    assert load_tokenizer(run).ignore_merges  # llama.cpp's llama3 pre-tokenizer looks whole words up first

    wrong = llama_gguf(tmp_path / "w.gguf", model, cfg, tok, extra_tensors={"rope_freqs.weight": (factors * 2, None)})
    with pytest.raises(LmforgeError, match="rope_freqs.weight matches no known Llama 3 RoPE scaling"):
        conv.convert(wrong, tmp_path / "w_run", progress=False)


# ---- HF directories ----


def test_hf_sharded_directory_to_bfloat16_run(tmp_path, tok):
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers import LlamaForCausalLM

    torch.manual_seed(1)
    hf_cfg = HFLlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                           tie_word_embeddings=False)
    hf = LlamaForCausalLM(hf_cfg).eval()
    src = tmp_path / "hf"
    hf.save_pretrained(src, max_shard_size="40KB")  # transformers' own (v5) layout, sharded
    assert (src / "model.safetensors.index.json").exists()
    tok.save(src)
    config = json.loads((src / "tokenizer_config.json").read_text())
    (src / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    run = conv.convert(src, tmp_path / "run", dtype="bfloat16", progress=False)
    loaded, _ = load_run(run)
    for name, t in hf.state_dict().items():
        ours = load_tensors(run)[name]
        assert ours.dtype == torch.bfloat16 and torch.equal(ours, t.to(torch.bfloat16)), name
    assert json.loads((run / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert (run / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert (run / "chat_template.jinja").read_text() == TEMPLATE
    assert load_tokenizer(run).encode(TEXTS[0]) == tok.encode(TEXTS[0])
    assert read_meta(run)["source"] == {"format": "hf"}


def test_lmforge_run_converts_unchanged_without_dtype(tmp_path, tok):
    model, cfg = tiny_model(tok.vocab_size)
    src = save_run(model, cfg, tmp_path / "src", tokenizer=tok)
    run = conv.convert(src, tmp_path / "run", progress=False)
    a, b = load_tensors(src), load_tensors(run)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert (run / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()


# ---- command line, bad inputs, atomicity ----


def run_main(argv, capsys) -> tuple[int, str, str]:
    rc = conv.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        conv.main(["--help"])
    assert e.value.code == 0 and "--from PATH" in capsys.readouterr().out


def test_cli_converts_and_reports(tmp_path, tok, capsys):
    model, cfg = tiny_model(tok.vocab_size)
    path = llama_gguf(tmp_path / "m.gguf", model, cfg, tok)
    rc, out, err = run_main(["--from", path, "--out", tmp_path / "run", "--dtype", "bfloat16"], capsys)
    assert rc == 0 and "converted" in out and "2 layers" in out and err == ""
    assert load_tensors(tmp_path / "run")["model.norm.weight"].dtype == torch.bfloat16
    rc, _, err = run_main(["--from", path, "--out", tmp_path / "run"], capsys)
    assert rc == 2 and "already exists and is not empty (pass --force" in err
    rc, _, err = run_main(["--from", path, "--out", tmp_path / "run", "--force"], capsys)
    assert rc == 0 and load_tensors(tmp_path / "run")["model.norm.weight"].dtype == torch.float32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "run"]  # nothing left beside it


def bad_inputs(tmp_path: Path, tok) -> dict[str, tuple[Path, str]]:
    model, cfg = tiny_model(tok.vocab_size)
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"not a gguf at all")
    truncated = tmp_path / "t.gguf"
    truncated.write_bytes(llama_gguf(tmp_path / "full.gguf", model, cfg, tok).read_bytes()[:-1000])
    sp = [m if m[0] != "tokenizer.ggml.model" else (m[0], "llama", V.STRING, None) for m in tokenizer_metadata(tok)]
    unknown_pre = tokenizer_metadata(tok, pre="brand-new")
    return {
        "missing": (tmp_path / "nope.gguf", "input not found"),
        "not gguf": (not_gguf, "is not a GGUF file"),
        "truncated": (truncated, "data runs past the end of the file"),
        "no config": (tmp_path, "has no config.json"),
        "architecture": (llama_gguf(tmp_path / "a.gguf", model, cfg, tok, arch="gpt2"),
                         "architecture 'gpt2' is not supported; lmforge converts llama"),
        "sentencepiece": (llama_gguf(tmp_path / "s.gguf", model, cfg, tok, tokenizer=sp),
                          "tokenizer model 'llama' is not supported; .*'gpt2'"),
        "pre-tokenizer": (llama_gguf(tmp_path / "p.gguf", model, cfg, tok, tokenizer=unknown_pre),
                          "pre-tokenizer 'brand-new' is not supported; known: .*smollm"),
        "extra tensor": (llama_gguf(tmp_path / "e.gguf", model, cfg, tok,
                                    extra_tensors={"blk.0.attn_q.bias": (np.zeros(64, np.float32), None)}),
                         "blk.0.attn_q.bias"),
        "rope scaling": (llama_gguf(tmp_path / "r.gguf", model, cfg, tok,
                                    extra_meta=[("llama.rope.scaling.type", "yarn", V.STRING, None)]),
                         "RoPE scaling 'yarn' is not supported"),
    }


def test_bad_inputs_exit_2_with_one_line(tmp_path, tok, capsys):
    (tmp_path / "in").mkdir()
    for case, (src, message) in bad_inputs(tmp_path / "in", tok).items():
        rc, out, err = run_main(["--from", src, "--out", tmp_path / "out"], capsys)
        assert rc == 2 and out == "", case
        assert err.startswith("lmforge convert: error: ") and err.count("\n") == 1, (case, err)
        assert re.search(message, err), (case, err)
        assert not (tmp_path / "out").exists() and sorted(os.listdir(tmp_path)) == ["in"], case
    with pytest.raises(SystemExit) as e:
        conv.main(["--from", "x", "--out", "y", "--dtype", "float16"])
    assert e.value.code == 2


def test_interrupted_convert_leaves_nothing(tmp_path, tok, monkeypatch):
    model, cfg = tiny_model(tok.vocab_size)
    path = llama_gguf(tmp_path / "m.gguf", model, cfg, tok)
    real_save_run = conv.save_run

    def save_then_fail(*args, **kwargs):
        real_save_run(*args, **kwargs)  # weights already written into the temp dir
        raise KeyboardInterrupt

    monkeypatch.setattr(conv, "save_run", save_then_fail)
    with pytest.raises(KeyboardInterrupt):
        conv.convert(path, tmp_path / "run", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["m.gguf"]
    monkeypatch.undo()
    first = convert_quietly(path, tmp_path / "run")
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    monkeypatch.setattr(conv, "save_run", save_then_fail)
    with pytest.raises(KeyboardInterrupt):
        conv.convert(path, tmp_path / "run", dtype="bfloat16", overwrite=True, progress=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before  # the old run, untouched
    assert sorted(os.listdir(tmp_path)) == ["m.gguf", "run"]


def test_out_must_differ_from_input(tmp_path, tok):
    model, cfg = tiny_model(tok.vocab_size)
    src = save_run(model, cfg, tmp_path / "src")
    with pytest.raises(LmforgeError, match="is the input itself"):
        conv.convert(src, src, overwrite=True)


# ---- the real SmolLM2-135M-Instruct GGUF ----

PROMPT = "<|im_start|>user\nWrite a short story about a robot who learns to paint.<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory):
    """Converted once per module (about 6 s); the warnings convert gave, kept for a test."""
    path = smollm2_path()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = conv.convert(path, tmp_path_factory.mktemp("smollm2") / "run", progress=False)
    return path, run, [str(w.message) for w in caught]


def test_smollm2_run(smollm2_run):
    path, run, caught = smollm2_run
    _, cfg = load_run(run)
    assert (cfg.vocab_size, cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim) == (
        49152, 576, 30, 9, 3, 1536)
    assert cfg.tie_embeddings and cfg.rope_theta == 100000.0 and cfg.norm_eps == 1e-5 and cfg.max_seq_len == 8192
    assert cfg.eos_token_id == 2 and cfg.bos_token_id is None  # the GGUF adds no BOS (add_bos_token false)
    template = conv.read_gguf(path).metadata["tokenizer.chat_template"]
    assert (run / "chat_template.jinja").read_text() == template
    assert json.loads((run / "tokenizer_config.json").read_text())["eos_token"] == "<|im_end|>"
    assert read_meta(run)["source"]["tensor_types"] == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    # 21 bytes (0x04, 0xC0, 0xF5.., ...) have no token in SmolLM2's vocabulary: lmforge's tokenizer drops them, as
    # HF tokenizers and llama.cpp do, so the run's tokenizer loads without a warning
    assert caught == []
    assert load_tokenizer(run).encode("\x04") == []


def lmforge_tokenizer(run: Path):
    """lmforge's own tokenizer of the run."""
    return load_tokenizer(run)


SMOL_TEXTS = [*TEXTS, "The capital of France is Paris.", "for i in range(10):\n    print(i)",
              "Ünïcödé — “quotes” and emoji 👩‍💻", "<|im_start|>system\nYou are helpful.<|im_end|>",
              "ids: 1234567890, pi=3.14159", "  leading and trailing  "]


def test_smollm2_digits_follow_llama_cpp(smollm2_run):
    """Whitespace runs before a digit: llama.cpp's 'smollm' split (= HF Digits + ByteLevel) keeps them whole."""
    from tokenizers import Tokenizer, pre_tokenizers

    _, run, _ = smollm2_run
    ours = Tokenizer.from_file(str(run / "tokenizer.json"))
    reference = Tokenizer.from_file(str(run / "tokenizer.json"))
    reference.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    lm = lmforge_tokenizer(run)
    for text in [*SMOL_TEXTS, "x  1", "list:\n\n1. one\n2. two", "    42"]:
        assert ours.encode(text).ids == reference.encode(text).ids == lm.encode(text, allowed_special="all"), text


@pytest.fixture(scope="module")
def smollm2_transformers(smollm2_run):
    """transformers' own load of the same GGUF (model and tokenizer): ~40 s of gguf-py parsing."""
    from transformers import AutoTokenizer

    path = smollm2_run[0]
    return transformers_from_gguf(path), AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.mark.slow
def test_smollm2_weights_logits_and_generation_match_transformers(smollm2_run, smollm2_transformers):
    _, run, _ = smollm2_run
    ref, ref_tok = smollm2_transformers
    ref_state = ref.state_dict()
    for name, t in load_tensors(run).items():
        assert torch.equal(t, ref_state[name]), name  # bit for bit: same dequantization, same unpermutation
    model, cfg = load_run(run)
    ids = ref_tok(PROMPT).input_ids
    with torch.no_grad():
        diff = (model(torch.tensor([ids]))[0, -1] - ref(torch.tensor([ids])).logits[0, -1]).abs().max().item()
    assert diff < 1e-3
    ours = list(generate(model, ids, SamplingParams(temperature=0, max_new_tokens=16), eos_token_id=cfg.eos_token_id))
    with torch.no_grad():
        theirs = ref.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=16,
                              pad_token_id=cfg.eos_token_id)[0, len(ids):].tolist()
    assert ours == theirs and len(ours) == 16
    print(f"\nSmolLM2 max |logit diff| vs transformers: {diff:.2e}; greedy: {ref_tok.decode(ours)!r}")


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers(smollm2_run, smollm2_transformers):
    """Equal to transformers' GGUF tokenizer on text without whitespace runs before digits (where transformers
    ignores the 'smollm' pre-tokenizer and groups them, see test_smollm2_digits_follow_llama_cpp)."""
    from tokenizers import Tokenizer

    _, run, _ = smollm2_run
    ref_tok = smollm2_transformers[1]
    ours = Tokenizer.from_file(str(run / "tokenizer.json"))
    lm = lmforge_tokenizer(run)
    for text in SMOL_TEXTS:
        expected = ref_tok(text, add_special_tokens=False).input_ids
        assert ours.encode(text).ids == expected, text
        assert lm.encode(text, allowed_special="all") == expected, text
        assert ref_tok.decode(expected) == lm.decode(expected) == text, text
    assert ref_tok("  x  1").input_ids != ours.encode("  x  1").ids  # the known difference, for the record
    assert ref_tok.chat_template == (run / "chat_template.jinja").read_text()
