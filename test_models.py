"""Tests of the model families beyond LLaMA and GPT-J (GPT-2, Qwen2, Qwen3, Mistral) against HF
transformers, and of what loading refuses (unsupported dtypes and options). Run:
python -m pytest -q test_models.py"""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import model as M
from test_lyaplock import (DEVICES, FIX, STORIES, assert_cached_generation_is_recompute, assert_matches_hf,
                           hf_load, padded_batch, roughen)

# kind -> (family, options); every family once plainly and once with its variants
KINDS = {
    "gpt2": ("gpt2", {}),
    "gpt2-bare-unscaled": ("gpt2", dict(bare=True, scale_attn_weights=False, n_inner=80)),
    "qwen2": ("qwen2", {}),
    "qwen2-gqa-tied-window": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True,
                                            use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    "qwen3": ("qwen3", dict(head_dim=24)),
    "qwen3-gqa-bias": ("qwen3", dict(num_key_value_heads=2, head_dim=16, attention_bias=True)),
    "mistral": ("mistral", dict(sliding_window=None)),
    "mistral-gqa-window": ("mistral", dict(num_key_value_heads=2, sliding_window=4, rope_theta=1e6)),
}


def make_checkpoint(path, kind, seed=0):
    """A random tiny checkpoint of `kind`, saved by transformers itself, with a tokenizer. GPT-2
    "bare" is saved from GPT2Model, whose names lack "transformer." (as OpenAI's GPT-2 files)."""
    import transformers as T
    family, opts = KINDS[kind]
    opts = dict(opts)
    torch.manual_seed(seed)
    if family == "gpt2":
        bare = opts.pop("bare", False)
        c = T.GPT2Config(vocab_size=50257, n_embd=64, n_layer=3, n_head=4, n_positions=64, **opts)
        hf = (T.GPT2Model if bare else T.GPT2LMHeadModel)(c)
        tok = FIX / "gpt2-tokenizer"
    else:
        kw = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5) | opts
        hf = {"qwen2": T.Qwen2ForCausalLM, "qwen3": T.Qwen3ForCausalLM, "mistral": T.MistralForCausalLM}[family](
            {"qwen2": T.Qwen2Config, "qwen3": T.Qwen3Config, "mistral": T.MistralConfig}[family](**kw))
        tok = STORIES
    roughen(hf)
    hf.save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok / f, path / f)
    return path


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread is faster than two, much faster on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """kind -> its checkpoint directory, made once per module (read-only for the tests)."""
    made = {}

    def get(kind):
        if kind not in made:
            made[kind] = make_checkpoint(tmp_path_factory.mktemp(kind), kind)
        return made[kind]
    return get


def hf_reference(hf, ids, mask):
    """transformers' logits, MLP keys (hooks on the edited projection) and hidden states."""
    blocks = hf.transformer.h if hasattr(hf, "transformer") else hf.model.layers
    seen = {}
    hooks = [(b.mlp.c_proj if hasattr(b.mlp, "c_proj") else b.mlp.down_proj).register_forward_pre_hook(
        lambda mod, args, i=i: seen.__setitem__(i, args[0])) for i, b in enumerate(blocks)]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)   # HF needs explicit positions under left padding
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)
    for h in hooks:
        h.remove()
    return ref, seen


# =============================================================================== parity
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("side", ["right", "left"])
def test_forward_matches_transformers(ckpt, kind, side, device):
    """float32 logits, MLP keys and layer outputs to 1e-4; the batch (lengths 7, 12, 3, 10) is
    longer than the window-4 kinds' window."""
    path = ckpt(kind)
    hf, ours = hf_load(path).to(device), M.load(path, device)
    L = ours.cfg.n_layers
    ids, mask = (t.to(device) for t in padded_batch(500, side))
    ref, seen = hf_reference(hf, ids, mask)
    assert_matches_hf(ours(ids, mask, keys_at=range(L), outs_at=range(L)), ref, seen, mask, L)


def test_configs_read_as_transformers_does(ckpt):
    """The family options land in the config; a window only where transformers applies one."""
    cfg = {k: M.load(ckpt(k)).cfg for k in ("gpt2-bare-unscaled", "qwen2", "qwen2-gqa-tied-window",
                                             "qwen3-gqa-bias", "mistral", "mistral-gqa-window")}
    assert cfg["gpt2-bare-unscaled"].attn_scale == 1.0 and cfg["gpt2-bare-unscaled"].d_mlp == 80
    assert cfg["qwen2"].qkv_bias and not cfg["qwen2"].attention_bias and cfg["qwen2"].sliding_window is None
    assert cfg["qwen2-gqa-tied-window"].window_layers == (1, 2) and cfg["qwen2-gqa-tied-window"].tie_embeddings
    assert cfg["qwen3-gqa-bias"].qk_norm and cfg["qwen3-gqa-bias"].head_dim == 16
    assert cfg["mistral"].window_layers == () and cfg["mistral-gqa-window"].window(0) == 4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["gpt2", "qwen2-gqa-tied-window", "qwen3-gqa-bias", "mistral-gqa-window"])
def test_bfloat16_error_is_that_of_transformers(ckpt, kind, device):
    """In bfloat16 our logits are as close to the float32 reference as transformers' own bfloat16
    logits are (mean absolute error within 1.5x of theirs, plus 0.1% of the logits' scale; on the
    CPU the two are bit-identical for the LLaMA-like families)."""
    path = ckpt(kind)
    ids, mask = (t.to(device) for t in padded_batch(500, "left"))
    real = mask.bool()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf_load(path).to(device)(input_ids=ids, attention_mask=mask, position_ids=pos).logits[real]
        import transformers as T
        hf16 = T.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
        theirs = hf16(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()[real]
    ours = M.load(path, device, "bfloat16")(ids, mask).logits[real]
    err_ours, err_theirs = (ours - ref).abs().mean(), (theirs - ref).abs().mean()
    assert err_theirs > 0                      # the check means something: bf16 does round
    assert err_ours <= 1.5 * err_theirs + 1e-3 * ref.abs().mean(), (float(err_ours), float(err_theirs))


# ============================================================================ generation
@pytest.mark.parametrize("kind", ["gpt2", "qwen2-gqa-tied-window", "qwen3-gqa-bias", "mistral-gqa-window"])
def test_kv_cache_generation_equals_recompute(ckpt, kind):
    """Cached decoding (left-padded batch) equals re-running the whole sequence per token, well
    past the window (prompts up to 6 tokens + 12 new, window 4); and transformers' greedy
    generation of the longest prompt gives the same tokens."""
    m = M.load(ckpt(kind))
    prompts = assert_cached_generation_is_recompute(m)
    got = M.generate(m, prompts, 12, stop_at_eos=False)
    hf = hf_load(ckpt(kind))
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompts[2]]), max_new_tokens=12, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    assert ref[0, len(prompts[2]):].tolist() == got[2]


def test_gpt2_learned_positions_end_with_a_clear_error(ckpt):
    m = M.load(ckpt("gpt2"))                      # n_positions 64
    ids = torch.randint(3, 500, (2, 70))
    mask = torch.ones_like(ids)
    mask[0, :6], mask[1, :10] = 0, 0              # left padding: 64 and 60 real tokens fit
    out = m(ids, mask).logits
    for b, pad in ((0, 6), (1, 10)):
        assert (out[b, pad:] - m(ids[b:b + 1, pad:]).logits[0]).abs().max() < 1e-4
    with pytest.raises(ValueError, match="70 tokens is longer than this GPT-2's 64 learned positions"):
        m(ids)


# ============================================================================ edit weights, save
@pytest.mark.parametrize("kind", ["gpt2", "gpt2-bare-unscaled", "qwen2-gqa-tied-window", "qwen3-gqa-bias",
                                  "mistral-gqa-window"])
def test_save_then_load_is_exact_and_transformers_reads_it(ckpt, tmp_path, kind):
    """An edit through the edit_weight alias, saved with edit_tensors: the file holds it in the
    stored layout under the checkpoint's own names, reloads bit-identically, and transformers
    reads it with our logits."""
    src = ckpt(kind)
    m = M.load(src)
    before = {n: t.clone() for n, t in m.state_dict().items()}
    W = m.edit_weight(1)
    assert W.shape == (m.cfg.d_model, m.cfg.d_mlp)
    W.add_(0.01 * torch.randn_like(W))           # in place: writes through to the parameter
    (name, stored), = m.edit_tensors([1]).items()
    assert name == m.edit_weight_name(1) and name in M.weight_files(src)
    assert stored.shape == load_file(src / "model.safetensors")[name].shape
    assert not torch.equal(stored, load_file(src / "model.safetensors")[name])
    M.save(src, tmp_path / "out", m.edit_tensors([1]))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in src.iterdir())
    assert set(M.weight_files(tmp_path / "out")) == set(M.weight_files(src))
    m2 = M.load(tmp_path / "out")
    changed = {n for n, t in m2.state_dict().items() if not torch.equal(t, before[n])}
    assert all(torch.equal(t, m.state_dict()[n]) for n, t in m2.state_dict().items())
    assert len(changed) == 1 and torch.equal(m2.edit_weight(1), W)
    ids, mask = padded_batch(500, "right")
    with torch.no_grad():
        ref = hf_load(tmp_path / "out")(input_ids=ids, attention_mask=mask).logits
    assert (m2(ids, mask).logits - ref)[mask.bool()].abs().max() < 1e-4


def test_gpt2_edit_weight_is_the_transposed_stored_weight(ckpt, tmp_path):
    """GPT-2's c_proj is stored [d_mlp, d_model] (Conv1D); the method's W is its (d_model, d_mlp)
    transpose and aliases it; save wants the stored layout and refuses edit_weight's."""
    m = M.load(ckpt("gpt2-bare-unscaled"))
    stored = m.transformer.h[2].mlp.c_proj.weight
    assert m.edit_weight_name(2) == "h.2.mlp.c_proj.weight"   # the bare file's own name
    assert stored.shape == (80, 64) and m.edit_weight(2).shape == (64, 80)
    key = m(torch.tensor([[5, 6, 7]]), keys_at={2}).keys[2]
    out = m.blocks[2].mlp.c_proj(key)
    assert torch.allclose(out, key @ m.edit_weight(2).T + m.blocks[2].mlp.c_proj.bias, atol=1e-5)  # out = W k + b
    m.edit_weight(2).copy_(torch.ones(64, 80))
    assert torch.equal(stored, torch.ones(80, 64))
    with pytest.raises(ValueError, match=r"shape \(64, 80\) given, the checkpoint stores \(80, 64\)"):
        M.save(ckpt("gpt2-bare-unscaled"), tmp_path / "out", {m.edit_weight_name(2): m.edit_weight(2)})
    assert not (tmp_path / "out").exists()


def test_load_edit_tensors_round_trips_and_checks(ckpt):
    m = M.load(ckpt("gpt2"))
    saved = {n: t.clone() for n, t in m.edit_tensors([0, 2]).items()}
    for l in (0, 2):
        m.edit_weight(l).mul_(2.0)
    m.load_edit_tensors(saved)
    assert all(torch.equal(t, saved[n]) for n, t in m.edit_tensors([0, 2]).items())
    with pytest.raises(M.CheckpointError, match="'transformer.h.0.mlp.c_fc.weight' is not an edited weight"):
        m.load_edit_tensors({"transformer.h.0.mlp.c_fc.weight": torch.zeros(64, 256)})
    with pytest.raises(M.CheckpointError, match=r"has shape \(64, 256\), the model stores \(256, 64\)"):
        m.load_edit_tensors({"transformer.h.0.mlp.c_proj.weight": torch.zeros(64, 256)})


@pytest.mark.parametrize("kind", ["gpt2", "qwen3-gqa-bias", "mistral-gqa-window"])
def test_names_through_layer_are_exactly_what_the_layer_depends_on(ckpt, kind):
    """Perturbing any tensor outside names_through_layer(1) leaves layer 1's output unchanged;
    perturbing any one inside changes it; the names are the checkpoint's."""
    m = M.load(ckpt(kind))
    names = m.names_through_layer(1)
    assert set(names) <= set(M.weight_files(ckpt(kind)))
    assert not any(".2." in n or "norm.weight" == n.split("model.")[-1] or "ln_f" in n for n in names)
    ids = torch.randint(3, 500, (2, 9))
    base = m(ids, stop_after=1, outs_at={1}).outs[1]
    by_name = {m.checkpoint_name(n): p for n, p in m.named_parameters()}
    g = torch.Generator().manual_seed(0)
    for n, p in by_name.items():
        keep = p.clone()
        p.add_(0.5 * torch.randn(p.shape, generator=g))
        moved = (m(ids, stop_after=1, outs_at={1}).outs[1] - base).abs().max()
        p.copy_(keep)
        assert (moved > 1e-4) == (n in names), n


# ============================================================================ what load refuses
def _stories_with(tmp_path, change):
    d = tmp_path / "ckpt"
    shutil.copytree(STORIES, d)
    w = load_file(d / "model.safetensors")
    change(w)
    save_file(w, d / "model.safetensors")
    return d


@pytest.mark.parametrize("dtype,code", [(torch.int8, "I8"), (torch.bool, "BOOL"), (torch.int32, "I32"),
                                        (torch.float8_e4m3fn, "F8_E4M3")])
def test_non_float_weights_are_refused_by_name(tmp_path, dtype, code):
    name = "model.layers.1.mlp.down_proj.weight"
    d = _stories_with(tmp_path, lambda w: w.__setitem__(name, w[name].to(dtype)))
    with pytest.raises(M.CheckpointError, match=f"tensor {name} has dtype {code}: quantised or integer "
                                                "checkpoints are not supported"):
        M.load(d)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_float_weights_of_any_width_load_cast(tmp_path, dtype):
    ref = M.load(STORIES)
    d = _stories_with(tmp_path, lambda w: w.update({n: t.to(dtype) for n, t in w.items()}))
    m = M.load(d)
    for n, t in m.state_dict().items():
        assert t.dtype == torch.float32 and torch.equal(t, ref.state_dict()[n].to(dtype).float()), n


def _config_with(tmp_path, ckpt_dir, **change):
    d = tmp_path / "ckpt"
    shutil.copytree(ckpt_dir, d)
    c = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(c | change))
    return d


@pytest.mark.parametrize("kind,change,message", [
    ("gpt2", dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx: true is not supported"),
    ("gpt2", dict(reorder_and_upcast_attn=True), "reorder_and_upcast_attn: true is not supported"),
    ("gpt2", dict(activation_function="relu"), "activation_function 'relu' is not supported"),
    ("qwen2", dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
    ("mistral", dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling .*only 'llama3'"),
    ("qwen3", dict(model_type="mamba"), "unsupported model_type 'mamba'.*"
                                        "'llama', 'gptj', 'gpt2', 'qwen2', 'qwen3', 'mistral'"),
])
def test_unsupported_options_are_refused(ckpt, tmp_path, kind, change, message):
    with pytest.raises(M.CheckpointError, match=message):
        M.load(_config_with(tmp_path, ckpt(kind), **change))


# ============================================================================ the command
def test_model_cli_prints_the_decoded_sequence(capsys):
    """The prompt and its continuation decoded together, so the space between them stays."""
    prompt = "Lily went to the"
    M.main([str(STORIES), "--prompt", prompt, "--max-new-tokens", "8", "--device", "cpu"])
    printed = capsys.readouterr().out
    m = M.load(STORIES)
    ids = m.tokenizer.encode(prompt)
    new = M.generate(m, [ids], 8)[0]
    assert printed == m.tokenizer.decode(ids + new) + "\n"
    assert printed.startswith(prompt + " ")


def test_tokenizer_does_not_truncate_as_transformers_does_not(ckpt):
    """The bundled GPT-2 tokenizer.json carries truncation at 50 tokens; encoding ignores it."""
    import transformers as T
    m = M.load(ckpt("gpt2"))
    text = " ".join(["Lily went to the store and bought a red apple."] * 20)
    ids = m.tokenizer.encode(text)
    assert len(ids) > 200 and m.tokenizer.decode(ids) == text
    assert ids == T.AutoTokenizer.from_pretrained(ckpt("gpt2"))(text)["input_ids"]


@pytest.mark.parametrize("kind", ["gpt2", "qwen2", "qwen3-gqa-bias", "mistral-gqa-window"])
def test_model_cli_continues_a_prompt_with_a_tiny_random_checkpoint_of_each_family(ckpt, kind, capsys):
    M.main([str(ckpt(kind)), "--prompt", "Once upon a time", "--max-new-tokens", "6", "--device", "cpu"])
    printed = capsys.readouterr().out
    m = M.load(ckpt(kind))
    ids = m.tokenizer.encode("Once upon a time")
    assert printed == m.tokenizer.decode(ids + M.generate(m, [ids], 6)[0]) + "\n"
    assert printed.startswith("Once upon a time") and len(printed) > len("Once upon a time\n")
