"""Tests of model.py against HF transformers: LLaMA and GPT-J (logits, keys, generation, sharded
and tied checkpoints, a real checkpoint's golden greedy output), then GPT-2, Qwen2, Qwen3,
Mistral, Gemma and Gemma 2, and what loading refuses (bad checkpoints, unsupported dtypes and options). Run:
python -m pytest -q test_models.py"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import model as M
from test_lyaplock import DEVICES, FIX, HERE, STORIES


# ----------------------------------------------------------------------------- LLaMA and GPT-J
def roughen(hf):
    """Make a random HF model's norms and biases non-trivial, so a mistake in them shows."""
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n or "ln_" in n or n.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
            else:
                p.mul_(3.0)


def make_hf_checkpoint(path: Path, kind: str, seed: int = 0, shard: bool = False) -> Path:
    """A random tiny HF checkpoint (saved by transformers itself) with a tokenizer beside it."""
    import transformers as T
    torch.manual_seed(seed)
    if kind.startswith("gptj"):     # tied: the norms' epsilon 1e-3, not the LayerNorm's default 1e-5
        c = T.GPTJConfig(vocab_size=50257, n_embd=64, n_layer=3, n_head=4, rotary_dim=8, n_positions=128,
                         tie_word_embeddings="tied" in kind, layer_norm_epsilon=1e-3 if "tied" in kind else 1e-5)
        hf = T.GPTJForCausalLM(c)
        tok = FIX / "gpt2-tokenizer"
    else:
        kw = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5)
        if "gqa" in kind:
            kw["num_key_value_heads"] = 2
        if "tied" in kind:
            kw["tie_word_embeddings"] = True
        if "headdim" in kind:
            kw["head_dim"] = 24
        if "bias" in kind:
            kw["attention_bias"] = kw["mlp_bias"] = True
        if "rope3" in kind:     # trained length 64: of the 16-dim head's wavelengths (6.3, 32, 167, ...)
            kw["rope_theta"] = 500000.0     # one under 64 / 4 kept, one blended, the rest slowed by 8
            kw["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        if "ropelinear" in kind:      # position interpolation, as vicuna-7b-v1.5-16k and LongChat
            kw["rope_scaling"] = {"rope_type": "linear", "factor": 4.0}
        hf = T.LlamaForCausalLM(T.LlamaConfig(**kw))
        tok = STORIES
    roughen(hf)
    hf.save_pretrained(path, max_shard_size="200KB" if shard else "5GB")
    if "rope3" in kind or "ropelinear" in kind:   # write rope as real checkpoints do (rope_theta + rope_scaling;
        c = json.loads((path / "config.json").read_text())      # linear's kind under "type", as vicuna's)
        rp = c.pop("rope_parameters")
        c["rope_theta"] = rp.pop("rope_theta")
        c["rope_scaling"] = {"type": rp.pop("rope_type"), **rp} if "ropelinear" in kind else rp
        (path / "config.json").write_text(json.dumps(c))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok / f, path / f)
    return path


def hf_load(path, dtype=torch.float32):
    import transformers as T
    image_text = json.loads((Path(path) / "config.json").read_text())["model_type"] == "mistral3"
    auto = T.AutoModelForImageTextToText if image_text else T.AutoModelForCausalLM   # (Gemma 3's is both)
    return auto.from_pretrained(path, dtype=dtype).eval()


def padded_batch(vocab, side, seed=1):
    g = torch.Generator().manual_seed(seed)
    lens = [7, 12, 3, 10]
    seqs = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]
    T = max(lens)
    ids, mask = torch.zeros(len(lens), T, dtype=torch.long), torch.zeros(len(lens), T, dtype=torch.long)
    for b, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
        ids[b, sl], mask[b, sl] = torch.tensor(s), 1
    return ids, mask


KINDS = ["llama", "llama-gqa-tied", "llama-gqa-rope3", "llama-ropelinear", "llama-headdim-bias", "gptj", "gptj-tied"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("side", ["right", "left"])
def test_forward_matches_transformers(tmp_path, kind, side, device):
    path = make_hf_checkpoint(tmp_path / kind, kind)
    hf, ours = hf_load(path).to(device), M.load(path, device)
    L = ours.cfg.n_layers
    ids, mask = (t.to(device) for t in padded_batch(min(ours.cfg.vocab_size, 500), side))
    pos = (mask.cumsum(-1) - 1).clamp(min=0)   # HF needs explicit positions under left padding
    seen = {}
    gptj = kind.startswith("gptj")
    mlps = [m.mlp for m in (hf.transformer.h if gptj else hf.model.layers)]
    hooks = [(m.fc_out if gptj else m.down_proj).register_forward_pre_hook(
        lambda mod, args, i=i: seen.__setitem__(i, args[0])) for i, m in enumerate(mlps)]
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)
    for h in hooks:
        h.remove()
    assert_matches_hf(ours(ids, mask, keys_at=range(L), outs_at=range(L)), ref, seen, mask, L)


def assert_matches_hf(out, ref, seen, mask, n_layers, tol=1e-4):
    """Our logits, MLP keys and layer outputs equal transformers' (`ref` with hidden states,
    `seen` the keys its hooks caught) on the real tokens."""
    real = mask.bool()
    assert (out.logits - ref.logits)[real].abs().max() < tol
    for i in range(n_layers):
        assert (out.keys[i] - seen[i])[real].abs().max() < tol
        if i < n_layers - 1:   # HF's last hidden state is after the final norm
            assert (out.outs[i] - ref.hidden_states[i + 1])[real].abs().max() < tol


def test_padding_side_and_batching_do_not_change_logits(tmp_path):
    ours = M.load(make_hf_checkpoint(tmp_path / "m", "llama-gqa-rope3"))
    (r_ids, r_mask), (l_ids, l_mask) = padded_batch(500, "right"), padded_batch(500, "left")
    r, l = ours(r_ids, r_mask).logits, ours(l_ids, l_mask).logits
    for b in range(r_ids.shape[0]):
        n = int(r_mask[b].sum())
        alone = ours(r_ids[b:b + 1, :n]).logits[0]
        assert (r[b, :n] - alone).abs().max() < 1e-5
        assert (l[b, -n:] - alone).abs().max() < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_stories260K_golden_greedy(device):
    """A real trained LLaMA (GQA): 200 greedy tokens from BOS, token for token."""
    golden = json.loads((STORIES / "golden_greedy.json").read_text())
    m = M.load(STORIES, device)
    assert m.tokenizer.encode("", bos=True) == golden["prompt_ids"]
    out = M.generate(m, [golden["prompt_ids"]], 200, stop_at_eos=False)[0]
    assert out == golden["greedy_ids"]
    assert m.tokenizer.decode(out).startswith("Once upon a time, there was a little girl named Lily.")


def assert_cached_generation_is_recompute(m, n_new=12):
    """Cached greedy decoding of a left-padded batch equals re-running each whole sequence per
    token; returns the prompts."""
    prompts = [[1, 5, 9, 33], [1, 44], [1, 7, 8, 9, 10, 11]]
    got = M.generate(m, prompts, n_new, stop_at_eos=False)
    for p, g in zip(prompts, got):   # no cache: re-run the whole sequence per token
        seq = list(p)
        for _ in range(n_new):
            seq.append(int(m(torch.tensor([seq])).logits[0, -1].argmax()))
        assert seq[len(p):] == g
    return prompts


def test_kv_cache_matches_recompute_and_sampling_is_seeded(tmp_path):
    m = M.load(make_hf_checkpoint(tmp_path / "m", "llama-gqa-rope3"))
    prompts = assert_cached_generation_is_recompute(m)
    a = M.generate(m, prompts, 10, top_k=5, seed=3, stop_at_eos=False)
    assert a == M.generate(m, prompts, 10, top_k=5, seed=3, stop_at_eos=False)
    assert a != M.generate(m, prompts, 10, top_k=5, seed=4, stop_at_eos=False)


def test_stop_start_and_logits_at(tmp_path):
    m = M.load(make_hf_checkpoint(tmp_path / "m", "gptj"))
    ids, mask = padded_batch(500, "left")
    B, layer = ids.shape[0], 1
    full = m(ids, mask, outs_at={layer})
    h = m(ids, mask, stop_after=layer, outs_at={layer}).outs[layer]
    assert torch.equal(full.outs[layer], h)
    resumed = m(ids, mask, start=(layer, h))       # the layers above from the given residual
    assert (resumed.logits - full.logits).abs().max() < 1e-5
    pushed = h.clone()
    pushed[:, -2] += torch.randn(B, m.cfg.d_model)  # a residual delta, as editing adds one
    assert (m(ids, mask, start=(layer, pushed)).logits[:, -2:] - full.logits[:, -2:]).abs().max() > 1e-3
    assert torch.equal(m(ids, mask, start=(layer, pushed)).logits[:, :-2], resumed.logits[:, :-2])
    at = torch.tensor([[0, 3]] * B)
    part = m(ids, mask, logits_at=at).logits
    assert torch.allclose(part, m(ids, mask).logits.gather(1, at[..., None].expand(-1, -1, part.shape[-1])),
                          atol=1e-5)
    assert m(ids, mask, stop_after=0).logits is None
    cache = M.KVCache(m.cfg, 1, ids.shape[1], "cpu", torch.float32)    # without a mask: every token real
    parts = [m(ids[:1, :5], cache=cache).logits, m(ids[:1, 5:], cache=cache).logits]
    assert (torch.cat(parts, 1) - m(ids[:1]).logits).abs().max() < 1e-5


def test_tokenizer_bos_rules(tmp_path):
    llama = M.load(STORIES)
    assert llama.tokenizer.encode("Once upon")[0] == 1
    gptj = M.load(make_hf_checkpoint(tmp_path / "g", "gptj"))
    assert gptj.tokenizer.encode("Hello world") == [15496, 995]   # GPT-2 BPE, no BOS
    assert gptj.tokenizer.bos_id == 50256 and gptj.tokenizer.eos_ids == [50256]


@pytest.mark.parametrize("pad", [-1, 10 ** 6])
def test_a_pad_id_outside_the_embedding_pads_with_a_real_token(tmp_path, pad):
    """Old Llama configs say pad_token_id -1: a padded batch indexed the embedding with it (an
    IndexError); padded positions are masked, so any real id pads as well. A BOS id outside the
    embedding is named (it would begin every prompt)."""
    d = tmp_path / "m"
    shutil.copytree(STORIES, d)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(config | {"pad_token_id": pad}))
    m = M.load(d)
    assert m.tokenizer.pad_id == m.tokenizer.eos_ids[0] == 2
    ids, mask = m.tokenizer.pad([[1, 5, 6], [1, 7]])
    assert ids[1, 2] == 2 and torch.allclose(m(ids, mask).logits[1, :2], m(ids[1:, :2], mask[1:, :2]).logits[0], atol=1e-5)
    (d / "config.json").write_text(json.dumps(config | {"bos_token_id": config["vocab_size"]}))
    (d / "tokenizer_config.json").unlink(missing_ok=True)
    with pytest.raises(M.CheckpointError, match=f"the BOS token id {config['vocab_size']} has no row in the embedding"):
        M.load(d)


@pytest.mark.parametrize("kind,shard", [("llama-gqa-tied", False), ("gptj", True)])
def test_save_then_load_is_exact_and_transformers_reads_it(tmp_path, kind, shard):
    src = make_hf_checkpoint(tmp_path / "src", kind, shard=shard)
    m = M.load(src)
    name = m.edit_weight_name(1)
    edited = m.edit_weight(1) + 0.01 * torch.randn_like(m.edit_weight(1))
    M.save(src, tmp_path / "out", {name: edited})
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in src.iterdir())
    if shard:
        assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    m2 = M.load(tmp_path / "out")
    for n, t in m2.state_dict().items():
        want = edited if n == name else m.state_dict()[n]
        assert torch.equal(t, want), n
    ids, mask = padded_batch(500, "right")
    with torch.no_grad():
        ref = hf_load(tmp_path / "out")(input_ids=ids, attention_mask=mask).logits
    assert (m2(ids, mask).logits - ref)[mask.bool()].abs().max() < 1e-4
    with pytest.raises(ValueError, match="input checkpoint"):
        M.save(src, src, {})
    M.save(src, tmp_path / "out", {name: edited})          # again over the same layout: replaced
    assert torch.equal(M.load(tmp_path / "out").state_dict()[name], edited)
    (tmp_path / "out" / "model-00009-of-00009.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"holds other weights \(model-00009-of-00009.safetensors\)"):
        M.save(src, tmp_path / "out", {name: edited})
    with pytest.raises(ValueError, match="is a file; the checkpoint is a directory"):
        M.save(src, tmp_path / "out" / "model-00009-of-00009.safetensors", {name: edited})
    victim = tmp_path / "victim"                        # another model's checkpoint, same file names
    shutil.copytree(STORIES, victim)
    before = {p.name: p.read_bytes() for p in victim.iterdir()}
    with pytest.raises(ValueError, match=f"{victim} holds another checkpoint \\(its config.json is not"):
        M.save(src, victim, {name: edited})
    assert {p.name: p.read_bytes() for p in victim.iterdir()} == before       # untouched
    twin, alone = tmp_path / "twin", tmp_path / "alone"        # src's config and file names, other weights:
    shutil.copytree(src, tmp_path / "base")                   # (two fine-tunes of one base) a save from another
    M.save(tmp_path / "base", twin, {name: -edited})          # directory, and weights files with no config.json
    alone.mkdir()
    for file in M.weight_files(src).values():
        shutil.copy(file, alone / file.name)
    for other in (twin, alone):
        before = {p.name: p.read_bytes() for p in other.iterdir()}
        with pytest.raises(ValueError, match=f"{other} holds weights that are not an earlier save of {src} as it is now"):
            M.save(src, other, {name: edited})
        assert {p.name: p.read_bytes() for p in other.iterdir()} == before
    for empty in ("", None):
        with pytest.raises(ValueError, match="save: the edited model's directory .*: give a path"):
            M.save(src, empty, {name: edited})
    M.save(src, tmp_path / "again", {name: edited})
    file = next(iter(M.weight_files(src).values()))        # src retrained in place (its files rewritten):
    os.utime(file, ns=(file.stat().st_atime_ns, file.stat().st_mtime_ns + 10 ** 9))   # another model now
    with pytest.raises(ValueError, match=f"again holds weights that are not an earlier save of {src} as it is now"):
        M.save(src, tmp_path / "again", {name: edited})


@pytest.mark.parametrize("dtype,code", [(torch.float16, "F16"), (torch.bfloat16, "BF16")])
def test_save_writes_the_stored_dtypes_and_keeps_each_files_metadata(tmp_path, dtype, code):
    """A checkpoint stored in 16 bits, loaded in float32 and edited: save writes the edited tensor in
    the stored dtype (as every other) and keeps each file's metadata (transformers' "format": "pt"),
    adding its own."""
    src = make_hf_checkpoint(tmp_path / "src", "llama", shard=True)
    for file in src.glob("*.safetensors"):
        save_file({n: t.to(dtype) for n, t in load_file(file).items()}, file, metadata={"format": "pt", "mine": "x"})
    m = M.load(src)
    name = m.edit_weight_name(1)
    edited = m.edit_weight(1) + 0.01 * torch.randn_like(m.edit_weight(1))
    M.save(src, tmp_path / "out", {name: edited})
    headers = M.tensor_headers(M.weight_files(tmp_path / "out"))
    assert {n: h[1:] for n, h in headers.items()} == {n: h[1:] for n, h in M.tensor_headers(M.weight_files(src)).items()}
    assert all(c == code for _, c, _ in headers.values())
    for file in src.glob("*.safetensors"):
        with M._open(tmp_path / "out" / file.name) as f:
            assert f.metadata() == {"format": "pt", "mine": "x", M.SAVED_FROM: M.saved_from(src)}
    assert torch.equal(M.load(tmp_path / "out").state_dict()[name], edited.to(dtype).float())


def test_save_leaves_out_weights_of_other_formats_and_training_state(tmp_path):
    """Beside its safetensors a checkpoint may hold the same (unedited) weights in other formats
    and a trainer's state: the saved directory leaves them out (a loader that prefers them, as
    from_pretrained(use_safetensors=False), would get the unedited model) and save names them;
    the files that describe the model are copied byte for byte; an `out` holding such weights
    is refused as other weights are."""
    src = tmp_path / "src"
    shutil.copytree(STORIES, src)
    describe = {"generation_config.json": '{"eos_token_id": 2}', "special_tokens_map.json": "{}",
                "README.md": "# stories\n", "LICENSE": "MIT\n", "merges.txt": "#version: 0.2\n",
                "tokenizer.model": "\x00sentencepiece"}
    other = ["pytorch_model.bin", "pytorch_model-00001-of-00002.bin", "pytorch_model.bin.index.json",
             "tf_model.h5", "flax_model.msgpack", "model.Q4_K_M.gguf", "consolidated.00.pth", "rust_model.ot",
             "optimizer.pt", "scheduler.pt", "rng_state_0.pth", "training_args.bin", "trainer_state.json",
             "consolidated.safetensors"]
    for name, text in describe.items():
        (src / name).write_text(text)
    for name in other:
        (src / name).write_bytes(b"unedited weights or training state")
    m = M.load(src)
    edited = {m.edit_weight_name(1): m.edit_weight(1) + 0.01}
    out = tmp_path / "out"
    assert M.save(src, out, edited) == sorted(other)
    kept = {p.name for p in STORIES.iterdir()} | set(describe)
    assert {p.name for p in out.iterdir()} == kept
    for name in kept - {"model.safetensors"}:
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    assert torch.equal(M.load(out).edit_weight(1), edited[m.edit_weight_name(1)])
    (out / "pytorch_model.bin").write_bytes(b"stale")
    with pytest.raises(ValueError, match=r"holds other weights \(pytorch_model.bin\)"):
        M.save(src, out, edited)


def test_generate_and_pad_name_what_they_cannot_take(tmp_path):
    """(They were max()'s ValueError, an IndexError in the embedding, an empty result for -2
    tokens, and right padding for any side not "left".) A checkpoint whose finite weights float16
    cannot hold is named so, not as holding NaN or Inf."""
    m = M.load(STORIES)
    for seqs, tokens, message in (([], 2, "give at least one prompt"), ([[1], []], 2, "each of at least one token"),
                                  ([[1, 512]], 2, "token id 512 is not one of the model's 512"),
                                  ([[1, None]], 2, "token id None is not one"),
                                  ([[1]], -2, "max_new_tokens -2: give a whole number of at least 0")):
        with pytest.raises(ValueError, match=f"generate: .*{message}"):
            M.generate(m, seqs, tokens)
    with pytest.raises(ValueError, match="pad: side 'lft': give 'left' or 'right'"):
        m.tokenizer.pad([[1, 2]], side="lft")
    big = tmp_path / "big"
    shutil.copytree(STORIES, big)
    w = load_file(big / "model.safetensors")
    w["model.norm.weight"][0] = 1e6
    save_file(w, big / "model.safetensors")
    with pytest.raises(M.CheckpointError, match="tensor model.norm.weight holds values beyond float16's range"):
        M.load(big, dtype="float16")
    assert M.load(big, dtype="bfloat16").norm.weight[0] == 1e6


def test_model_cli_prints_a_continuation():
    r = subprocess.run([sys.executable, str(HERE / "model.py"), str(STORIES), "--max-new-tokens", "12"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Once upon a time")


def test_model_cli_names_a_prompt_that_is_not_text_and_notes_a_run_past_the_positions(capsys, ckpt):
    """A --prompt of bytes that are not UTF-8 (the shell passes them as lone surrogates: a TypeError
    in the tokenizer) is one line; generating past the model's positions, which editing refuses,
    goes on with a note (stories260K: 512)."""
    with pytest.raises(SystemExit):
        M.main([str(STORIES), "--prompt", "Once \udcff"])
    assert "error: --prompt is not valid text: surrogates not allowed at character 5" in capsys.readouterr().err
    M.main([str(STORIES), "--prompt", "Once upon a time", "--max-new-tokens", "508"])
    assert capsys.readouterr().err == ("note: the prompt (5 tokens) and --max-new-tokens 508 go past the model's 512 "
                                       "positions (max_position_embeddings): what follows is past what it was trained on\n")
    capsys.readouterr()
    host = M.device_memory(torch.device("cpu"))         # a cache past the host's memory: one line, not the
    layer = 2 * 4 * 8 * 4                               # kernel's kill (stories260K: 4 kv heads of 8, float32)
    huge = host // (5 * layer) + 1                      # (5 layers)
    with pytest.raises(SystemExit, match=f"error: --max-new-tokens {huge - 5}: the key-value cache for {huge:,} "
                                         r"positions takes .* GiB on cpu, where .* GiB is free"):
        M.main([str(STORIES), "--prompt", "Once upon a time", "--max-new-tokens", str(huge - 5)])
    n = M.load(ckpt("gpt2")).cfg.max_positions          # learned positions: refused before generating
    with pytest.raises(SystemExit, match=f"go past the model's {n} positions \\(n_positions\\)"):
        M.main([str(ckpt("gpt2")), "--prompt", "Hello", "--max-new-tokens", str(n)])


def test_loading_and_running_a_model_does_not_import_torchs_compiler(ckpt):
    """Building the modules on the meta device must not run tensor maths there (torch routes
    meta ops through its reference implementations, which import the compiler: a second of
    every command's start). Checked for a rotary model and one with learned positions."""
    code = ("import sys, torch, model as M\n"
            "for p in sys.argv[1:]:\n"
            "    m = M.load(p); m(torch.tensor([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.long))\n"
            "print('torch._dynamo' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code, str(STORIES), str(ckpt("gpt2"))], cwd=HERE,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def _broken(tmp_path, how):
    d = tmp_path / how
    shutil.copytree(STORIES, d)
    st = d / "model.safetensors"
    w = load_file(st)
    if how == "no-config":
        (d / "config.json").unlink()
    elif how == "unknown-type":
        c = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**c, "model_type": "mamba"}))
    elif how == "missing":
        del w["model.layers.2.mlp.up_proj.weight"]
        save_file(w, st)
    elif how == "extra":
        w["model.layers.2.mlp.extra.weight"] = torch.zeros(2)
        save_file(w, st)
    elif how == "shape":
        w["model.layers.3.mlp.down_proj.weight"] = torch.zeros(64, 171)
        save_file(w, st)
    elif how == "nan":
        w["model.norm.weight"][3] = float("nan")
        save_file(w, st)
    elif how == "truncated":
        st.write_bytes(st.read_bytes()[:50_000])
    elif how == "weights-directory":       # (was: "unreadable safetensors file ...: No such device")
        st.unlink()
        st.mkdir()
    elif how.startswith("index:"):        # model.safetensors.index.json holding <text>; "index:/" a directory
        text = how.removeprefix("index:")
        index = d / "model.safetensors.index.json"
        index.mkdir() if text == "/" else index.write_text(text)
    elif how == "no-tokenizer":
        (d / "tokenizer.json").unlink()
    elif how == "tokenizer-config-json":
        (d / "tokenizer_config.json").write_text('{"bos_token": "<s>",')
    elif how == "unknown-bos":
        (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>", "add_bos_token": True}))
    elif how == "generation-config-eos":
        (d / "generation_config.json").write_text(json.dumps({"eos_token_id": "</s>"}))
    elif how == "tokenizer-truncated":
        (d / "tokenizer.json").write_bytes((d / "tokenizer.json").read_bytes()[:1000])
    elif how.startswith("config:"):            # config:<field>=<JSON value>, or config:<JSON document>
        c = json.loads((d / "config.json").read_text())
        field, _, value = how.removeprefix("config:").partition("=")
        (d / "config.json").write_text(json.dumps({**c, field: json.loads(value)}) if value else field)
    elif how == "config-not-utf8":
        (d / "config.json").write_bytes(b'{"model_type": "llama\xff"}')
    elif how == "vocab":           # config.json and the weights of 400 tokens, the tokenizer's 512
        c = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**c, "vocab_size": 400}))
        w["model.embed_tokens.weight"] = w["model.embed_tokens.weight"][:400].clone()
        save_file(w, st)
    return d


@pytest.mark.parametrize("how,message", [
    ("no-config", "config.json is missing"),
    ("unknown-type", "unsupported model_type 'mamba'.*'llama', 'gptj'"),
    ("missing", "missing tensor.*model.layers.2.mlp.up_proj.weight"),
    ("extra", "unexpected tensor.*model.layers.2.mlp.extra.weight"),
    ("shape", r"model.layers.3.mlp.down_proj.weight has shape \(64, 171\).*\(64, 172\)"),
    ("nan", "model.norm.weight contains NaN"),
    ("truncated", "model.safetensors: unreadable safetensors file"),
    ("weights-directory", r"model.safetensors: a directory, where the checkpoint's weights \(a safetensors file\)"),
    ("index:/", r"model.safetensors.index.json: not a valid safetensors index \(.*Is a directory"),
    ('index:{"weight_map": [1]}', "model.safetensors.index.json: not a valid safetensors index .its weight_map is not"),
    ("index:[1]", "model.safetensors.index.json: not a valid safetensors index"),
    ("no-tokenizer", "tokenizer.json is missing"),
    ("tokenizer-config-json", "tokenizer_config.json: not a readable JSON file"),
    ("tokenizer-truncated", "tokenizer.json: not a readable tokenizer"),
    ("config:[1, 2]", "config.json: expected a JSON object, got list"),
    ("config-not-utf8", "config.json: not a readable JSON file .*utf-8"),
    ('config:num_hidden_layers="5"', "num_hidden_layers '5' is not a whole number of at least 1"),
    ("config:num_attention_heads=-8", "num_attention_heads -8 is not a whole number of at least 1"),
    ("config:num_attention_heads=0", "num_attention_heads 0 is not a whole number of at least 1"),   # (was 'division by zero')
    ("config:num_key_value_heads=0", "num_key_value_heads 0 is not a whole number of at least 1"),   # (was: as absent)
    ('config:rms_norm_eps="tiny"', "norm_eps 'tiny' is not a positive number"),
    ("config:rope_theta=-1", "rope_theta -1 is not a positive number"),
    ('config:model_type=["llama"]', r"unsupported model_type \['llama'\]"),          # (was: unhashable type)
    ('config:eos_token_id="2"', "eos_token_id '2' is not supported .a token id is a whole number"),  # (was a TypeError
    ("config:eos_token_id=[[2]]", r"eos_token_id \[\[2\]\] is not supported"),                     # in the tokenizer)
    ("config:pad_token_id=1e30", "pad_token_id 1e.30 is not supported"),
    ("config:pad_token_id=9223372036854775808", "pad_token_id 9223372036854775808 is not supported"),   # (past int64)
    ("config:bos_token_id=[1]", r"bos_token_id \[1\] is not supported .a token id is a whole number"),   # (EOS alone lists)
    ("unknown-bos", "tokenizer_config.json: bos_token '<bos>' is not a token of .*tokenizer.json"),
    ("generation-config-eos", "generation_config.json: eos_token_id '</s>' is not a token id"),
    ("vocab", r"tokenizer.json: the tokenizer has 512 tokens with ids up to 511, but config.json's vocab_size "
              r"is 400: 112 of them \(the first '.+', id 400\) have no row in the model's embedding"),
])
def test_bad_checkpoints_give_clear_errors(tmp_path, how, message):
    with pytest.raises(M.CheckpointError, match=message):
        M.load(_broken(tmp_path, how))


def test_soft_caps_and_a_logits_scaling_that_would_make_the_logits_non_finite_are_refused():
    """Gemma 2's caps divide the scores and logits, Granite's logits_scaling the logits: 0 gave
    NaN or inf logits, text a TypeError at the first forward pass; null (no cap) stays allowed."""
    sizes = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=100, head_dim=16)
    for key, field in (("attn_logit_softcapping", "attn_softcap"), ("final_logit_softcapping", "final_softcap")):
        assert getattr(M.Config.from_hf(dict(model_type="gemma2", **sizes, **{key: None})), field) is None
        for bad in (0, -30.0, "x", float("inf")):
            with pytest.raises(M.CheckpointError, match=f"{key} {bad!r} is not supported .a soft cap is a positive"):
                M.Config.from_hf(dict(model_type="gemma2", **sizes, **{key: bad}))
    for bad, message in ((0, "logits_scaling 0 is not supported .the logits are divided by it"),
                         (float("inf"), "logits_scaling inf is not supported .Granite's scalars are finite")):
        with pytest.raises(M.CheckpointError, match=message):
            M.Config.from_hf(dict(model_type="granite", **sizes, logits_scaling=bad))


def test_a_head_dim_apart_from_the_hidden_size_is_read_where_transformers_reads_it():
    """Phi and the LLaMA layout take head_dim as given (hidden 64, 4 heads of 24), as transformers;
    GPT-2's, GPT-J's and GPT-NeoX's heads split the hidden size, which must divide."""
    sizes = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=100, head_dim=24)
    for family in ("phi", "llama", "qwen3"):
        assert M.Config.from_hf(dict(model_type=family, **sizes)).head_dim == 24
    with pytest.raises(M.CheckpointError, match="the hidden size 64 is not divisible by the 6 attention heads"):
        M.Config.from_hf(dict(model_type="gpt_neox", **sizes | dict(num_attention_heads=6, num_key_value_heads=6)))


def test_a_model_path_that_is_no_directory_is_named_so(tmp_path):
    """--model naming a file, or nothing (was: "<path>/config.json: config.json is missing")."""
    with pytest.raises(M.CheckpointError, match=f"{tmp_path / 'nope'}: no such checkpoint directory"):
        M.checkpoint_config(tmp_path / "nope")
    with pytest.raises(M.CheckpointError, match="config.json is a file; give the checkpoint's directory"):
        M.load(STORIES / "config.json")


def test_a_tokenizer_past_vocab_size_is_one_line_from_the_cli_and_a_smaller_one_loads(tmp_path, capsys):
    """Ids past config.json's vocab_size would index past the embedding (an IndexError deep in the
    forward pass): the model CLI says so in one line. A vocabulary smaller than vocab_size, as
    checkpoints pad their embedding to a round size, loads and gives the unpadded logits."""
    with pytest.raises(SystemExit, match=r"^error: .*tokenizer.json: the tokenizer has 512 tokens .* vocab_size is 400"):
        M.main([str(_broken(tmp_path, "vocab")), "--prompt", "Once upon a time", "--max-new-tokens", "2"])
    padded = tmp_path / "padded"
    shutil.copytree(STORIES, padded)
    w = load_file(padded / "model.safetensors")
    w["model.embed_tokens.weight"] = torch.cat([w["model.embed_tokens.weight"], torch.zeros(128, 64)])
    save_file(w, padded / "model.safetensors")
    c = json.loads((padded / "config.json").read_text())
    (padded / "config.json").write_text(json.dumps({**c, "vocab_size": 640}))
    ours, theirs = M.load(STORIES), M.load(padded)
    ids = torch.tensor([ours.tokenizer.encode("Once upon a time, Lily found a red ball.")])
    assert torch.equal(theirs(ids).logits[..., :512], ours(ids).logits)


def run_the_suggested_command(error) -> str:
    """Run, with this interpreter, the transformers command a loading error ends with; return it."""
    command = str(error).split("with transformers: ", 1)[1]
    assert command.startswith("python -c ")
    subprocess.run(sys.executable + command[len("python"):], shell=True, check=True, capture_output=True)
    return command


def test_pickled_weights_are_refused_with_a_conversion_that_works(tmp_path):
    """A checkpoint with only pytorch_model.bin (GPT-J-6B's and many older uploads): never
    unpickled; the error gives the transformers command that writes a safetensors copy, and that
    copy (run here as given) loads with the same logits and tokens."""
    src = tmp_path / "pickled"
    src.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(STORIES / f, src / f)
    torch.save(load_file(STORIES / "model.safetensors"), src / "pytorch_model.bin")
    with pytest.raises(M.CheckpointError, match="pytorch_model.bin.*never unpickles") as e:
        M.load(src)
    assert run_the_suggested_command(e.value) == M.convert_command(src)
    ours, copied = M.load(STORIES), M.load(tmp_path / "pickled-safetensors")
    text = "Once upon a time, Lily found a red ball."
    assert copied.tokenizer.encode(text) == ours.tokenizer.encode(text)
    ids = torch.tensor([ours.tokenizer.encode(text)])
    assert torch.equal(copied(ids).logits, ours(ids).logits)


def test_a_missing_tokenizer_json_comes_with_the_command_that_writes_it(tmp_path):
    """GPT-2 style vocab.json + merges.txt without tokenizer.json: the error's transformers
    command, run as given, writes one that encodes as the original."""
    tok = json.loads((FIX / "gpt2-tokenizer" / "tokenizer.json").read_text())
    src = make_checkpoint(tmp_path / "g", "gpt2")
    (src / "tokenizer.json").unlink()
    (src / "vocab.json").write_text(json.dumps(tok["model"]["vocab"]))
    merges = (m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"])
    (src / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    with pytest.raises(M.CheckpointError, match="tokenizer.json is missing.*vocab.json and merges.txt") as e:
        M.load(src)
    run_the_suggested_command(e.value)
    text = "Hello world, the Eiffel Tower is in Paris. 12345 ünïcode"
    m = M.load(src)
    assert m.tokenizer.encode(text) == M.Tokenizer(FIX / "gpt2-tokenizer", m.cfg).encode(text)


# ----------------------------------------------------------------------------- GPT-2, Qwen2, Qwen3, Mistral, Gemma
# LongRoPE's per-frequency factors for 3/4 of a 16-dim head (6 frequencies), short and long
PHI_LONGROPE = {"rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(6)],
                "long_factor": [1.0 + 2.0 * i for i in range(6)]}
MINISTRAL3_ROPE = dict(rope_type="yarn", rope_theta=1e6, factor=4.0, original_max_position_embeddings=4,
                       beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0, llama_4_scaling_beta=0.1)
# kind -> (family, options); every family once plainly and once with its variants
KINDS = {
    "gpt2": ("gpt2", {}),
    # ... saved as OpenAI's files are (names without "transformer."), the scores unscaled, an MLP of 80,
    # the norms' epsilon 1e-3 (the LayerNorm's default is 1e-5: here one left out shows)
    "gpt2-bare-unscaled": ("gpt2", dict(bare=True, scale_attn_weights=False, n_inner=80, layer_norm_epsilon=1e-3)),
    "qwen2": ("qwen2", {}),
    "qwen2-gqa-tied-window": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True,
                                            use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    "qwen3": ("qwen3", dict(head_dim=24)),
    "qwen3-gqa-bias": ("qwen3", dict(num_key_value_heads=2, head_dim=16, attention_bias=True)),
    "mistral": ("mistral", dict(sliding_window=None)),
    "mistral-gqa-window": ("mistral", dict(num_key_value_heads=2, sliding_window=4, rope_theta=1e6)),
    # Gemma: head_dim not hidden / heads (16), as the real ones' 256; the head tied by default;
    # config.json's hidden_act "gelu" as Gemma's releases say it (transformers: the tanh GELU); a hidden
    # size of 72, whose sqrt (the embeddings' scale) bfloat16 rounds (8.485 to 8.5), as 2048's (45.25)
    "gemma": ("gemma", dict(head_dim=32, hidden_act="gelu", hidden_size=72)),
    "gemma-gqa-untied": ("gemma", dict(num_key_value_heads=2, head_dim=24, tie_word_embeddings=False)),
    # Gemma 2 with transformers' defaults (window 4096 on layers 0, 2; caps 50 and 30) ...
    "gemma2": ("gemma2", dict(head_dim=32, num_hidden_layers=4, query_pre_attn_scalar=32)),
    # ... and with a window of 4 (shorter than the test batches) on layers 1, 2, caps 1 and 3
    "gemma2-gqa-window-caps": ("gemma2", dict(num_key_value_heads=2, head_dim=24, num_hidden_layers=4,
                                              sliding_window=4, query_pre_attn_scalar=20,
                                              attn_logit_softcapping=1.0, final_logit_softcapping=3.0,
                                              layer_types=["full_attention", "sliding_attention",
                                                           "sliding_attention", "full_attention"])),
    # Gemma 3 with transformers' defaults (window 4096 on five layers in six: here all 3) ...
    "gemma3": ("gemma3_text", dict(head_dim=32, query_pre_attn_scalar=32)),
    # ... and a window of 4 on layers 0, 1, 3, its local rope base 100, the global one 1e4 scaled by 8
    "gemma3-gqa-window-ropes": ("gemma3_text", dict(num_key_value_heads=2, head_dim=24, num_hidden_layers=4,
                                                     sliding_window=4, query_pre_attn_scalar=20,
                                                     rope_theta=1e4, rope_local_base_freq=100.0,
                                                     rope_scaling={"rope_type": "linear", "factor": 8.0},
                                                     layer_types=["sliding_attention", "sliding_attention",
                                                                  "full_attention", "sliding_attention"])),
    # OLMo (the first) as OLMo-1B-hf is released (norms without weights, untied) and as OLMo-7B-0424-hf
    # (q, k and v clamped: here to ±0.05, which the random projections pass) with GQA and biases
    "olmo": ("olmo", dict()),
    "olmo-clip-gqa-bias": ("olmo", dict(clip_qkv=0.05, num_key_value_heads=2, attention_bias=True)),
    # StableLM 2 1.6B as released (LayerNorms, rope over a quarter of each head, q/k/v biases) and
    # stablelm-3b-4e1t's kind of block with GQA, half of each head turned, tied, no biases, the norms'
    # epsilon 1e-3 (the LayerNorm's default is 1e-5: here one left out shows)
    "stablelm": ("stablelm", dict(use_qkv_bias=True)),
    "stablelm-gqa-half-tied": ("stablelm", dict(num_key_value_heads=2, partial_rotary_factor=0.5,
                                                tie_word_embeddings=True, layer_norm_eps=1e-3)),
    # OLMo 2 as released (rope 5e5, untied) and with GQA and biases: norms on the outputs only,
    # over the whole q and k projections
    "olmo2": ("olmo2", dict(rope_theta=500000.0, rms_norm_eps=1e-6)),
    "olmo2-gqa-bias": ("olmo2", dict(num_key_value_heads=2, attention_bias=True)),
    # GPT-NeoX as Pythia is released (rope over a quarter of each head, the erf GELU, parallel
    # attention and MLP, untied) and as its other configs can say (rope over half a head at base
    # 100, the tanh GELU under NeoX-20B's name gelu_fast, attention then MLP, tied, no biases on
    # attention, rope keys as transformers 5 writes them, the norms' epsilon 1e-3)
    "gpt-neox": ("gpt_neox", dict(rotary_pct=0.25, rotary_emb_base=10000, hidden_act="gelu")),
    "gpt-neox-sequential": ("gpt_neox", dict(use_parallel_residual=False, hidden_act="gelu_fast", layer_norm_eps=1e-3,
                                             tie_word_embeddings=True, attention_bias=False,
                                             rope_parameters={"rope_type": "default", "rope_theta": 100.0,
                                                              "partial_rotary_factor": 0.5})),
    # Phi-3 (q, k, v and gate, up each in one projection) with GQA as Phi-3-medium and Phi-4; and as
    # Phi-3.5-mini and Phi-4-mini: LongRoPE (here trained to 8 positions, so the test batches' 12 take
    # the long factors), rope over 3/4 of each head, a window over every layer, tied
    "phi3": ("phi3", dict(num_key_value_heads=2, pad_token_id=0)),
    "phi3-longrope-window": ("phi3", dict(pad_token_id=0, partial_rotary_factor=0.75, rope_scaling=PHI_LONGROPE,
                                          original_max_position_embeddings=8, max_position_embeddings=64,
                                          sliding_window=5, tie_word_embeddings=True)),
    # Phi-1.5 and Phi-2 (attention and MLP in parallel off one LayerNorm, biases everywhere, the head's
    # too; rope over half of each head), and with GQA, a tied head, the erf GELU, a quarter turned, the
    # norms' epsilon 1e-3
    "phi": ("phi", dict(partial_rotary_factor=0.5)),
    "phi-gqa-tied-erf": ("phi", dict(num_key_value_heads=2, tie_word_embeddings=True, hidden_act="gelu",
                                     partial_rotary_factor=0.25, rope_theta=100.0, layer_norm_eps=1e-3)),
    # OLMo 3 as released (a window on three layers in four; YaRN on the full layers, its attention
    # factor given) and with the layer kinds named, each kind's rope base its own, GQA
    "olmo3": ("olmo3", dict(num_hidden_layers=4, sliding_window=4, max_position_embeddings=1024, rope_theta=5e5,
                            rope_scaling=dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=128,
                                              attention_factor=1.2079441541679836, beta_fast=32, beta_slow=1))),
    "olmo3-gqa-kinds": ("olmo3", dict(num_key_value_heads=2, sliding_window=4,
                                      layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                      rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e4},
                                                       "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})),
    # YaRN on Qwen2 (as Qwen's model cards tell to add it), its ramp over most dims (base 100, 256
    # trained positions), the attention factor 0.1 ln 4 + 1 derived
    "qwen2-yarn": ("qwen2", dict(rope_theta=100.0, max_position_embeddings=1024,
                                 rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=256))),
    # SmolLM3 as released (GQA, tied, rope base 2e6, every fourth layer NoPE: here layer 3), and with
    # its NoPE layers named (1, 2), a window of 4 on them, untied, biases on attention and the MLP
    "smollm3": ("smollm3", dict(num_key_value_heads=2, num_hidden_layers=4, pad_token_id=0)),
    "smollm3-nope-window-bias": ("smollm3", dict(pad_token_id=0, no_rope_layers=[1, 0, 0], use_sliding_window=True, sliding_window=4,
                                                 tie_word_embeddings=False, attention_bias=True, mlp_bias=True,
                                                 rope_theta=1e4)),
    # GLM-4-9B (glm: q/k/v biases, gate and up fused, rope on interleaved pairs of half of each head)
    # and GLM-4-0414 (glm4: norms on the outputs of attention and the MLP, under its own names), as
    # released but for sizes; and GLM-4 with the whole head turned, no biases, an explicit head_dim, tied
    "glm": ("glm", dict(num_key_value_heads=2, head_dim=16, pad_token_id=0)),
    "glm4": ("glm4", dict(num_key_value_heads=2, head_dim=16, pad_token_id=0)),
    "glm4-full-rope-tied": ("glm4", dict(head_dim=24, partial_rotary_factor=1.0, attention_bias=False,
                                         tie_word_embeddings=True, pad_token_id=0)),
    # Granite 3.3-8B's four scalars (embeddings x12, attention scores x1/128, attention's and the MLP's
    # outputs x0.22 before the add, logits /16), GQA, tied, as released but for sizes; and other
    # values of each (the scores x0.3, not 1/sqrt(16); the logits /2.5, which rounds where /16 does not),
    # biases on attention and the MLP, untied
    "granite": ("granite", dict(num_key_value_heads=2, embedding_multiplier=12.0, attention_multiplier=0.0078125,
                                residual_multiplier=0.22, logits_scaling=16.0, tie_word_embeddings=True,
                                rope_theta=1e7, pad_token_id=0)),
    "granite-bias-untied": ("granite", dict(embedding_multiplier=3.0, attention_multiplier=0.3, residual_multiplier=0.5,
                                            logits_scaling=2.5, attention_bias=True, mlp_bias=True,
                                            tie_word_embeddings=False)),
    # Ministral 3's text model: YaRN (x4 from 4 trained positions) with Llama 4's query scale from
    # there on (the test batches' positions take three scales), GQA; and Mistral 3's image-text checkpoints: Ministral 3's
    # (tied, as transformers writes it where the release leaves it out) and Mistral Small 3.1's (a
    # Mistral text model, its head its own)
    "ministral3": ("ministral3", dict(num_key_value_heads=2, head_dim=16, pad_token_id=0, rope_parameters=MINISTRAL3_ROPE)),
    "mistral3": ("mistral3", dict(model_type="ministral3", num_key_value_heads=2, head_dim=16, pad_token_id=0,
                                  rope_parameters=MINISTRAL3_ROPE, top={})),
    "mistral3-small": ("mistral3", dict(model_type="mistral", num_key_value_heads=2, head_dim=16, pad_token_id=0,
                                        sliding_window=None, rope_theta=1e9, top=dict(tie_word_embeddings=False))),
    # Gemma 3's image-text checkpoint (4B and up): a vision tower beside the language model
    "gemma3-image-text": ("gemma3", dict(num_key_value_heads=2, head_dim=24, num_hidden_layers=4, sliding_window=4,
                                         query_pre_attn_scalar=20, rope_scaling={"rope_type": "linear", "factor": 8.0},
                                         layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                                      "sliding_attention"])),
}
FAMILY_CLASSES = {"qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral", "gemma": "Gemma", "gemma2": "Gemma2",
                  "gemma3_text": "Gemma3", "olmo": "Olmo", "stablelm": "StableLm", "olmo2": "Olmo2", "olmo3": "Olmo3", "gpt_neox": "GPTNeoX", "phi3": "Phi3", "phi": "Phi",
                  "smollm3": "SmolLM3", "glm": "Glm", "glm4": "Glm4", "granite": "Granite", "ministral3": "Ministral3"}
CONFIG_CLASSES = {"gemma3_text": "Gemma3TextConfig"}     # Gemma3Config is the multimodal one


def make_checkpoint(path, kind, seed=0, **change):
    """A random tiny checkpoint of `kind` (with the config keys `change`), saved by transformers
    itself, with a tokenizer. GPT-2 "bare" is saved from GPT2Model, whose names lack
    "transformer." (as OpenAI's GPT-2 files)."""
    import transformers as T
    family, opts = KINDS[kind]
    opts = dict(opts) | change
    torch.manual_seed(seed)
    if family == "gpt2":
        bare = opts.pop("bare", False)
        c = T.GPT2Config(**dict(vocab_size=50257, n_embd=64, n_layer=3, n_head=4, n_positions=64) | opts)
        hf = (T.GPT2Model if bare else T.GPT2LMHeadModel)(c)
        tok = FIX / "gpt2-tokenizer"
    else:
        kw = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
        if family not in ("gpt_neox", "phi"):      # LayerNorm (GPT-NeoX: no grouped queries)
            kw |= dict(num_key_value_heads=4, rms_norm_eps=1e-5)
        kw |= opts
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      image_size=28, patch_size=14)
        if family == "gemma3":     # the language model as text_config, a tiny vision tower beside it
            hf = T.Gemma3ForConditionalGeneration(T.Gemma3Config(
                text_config=kw, vision_config=vision, mm_tokens_per_image=4, image_token_index=510,
                boi_token_index=508, eoi_token_index=509))
        elif family == "mistral3":   # so too, a Pixtral tower; `top`: the image-text config's own keys
            top = kw.pop("top")
            hf = T.Mistral3ForConditionalGeneration(T.Mistral3Config(
                text_config=kw, vision_config=dict(vision, model_type="pixtral", head_dim=16), **top))
        else:
            name = FAMILY_CLASSES[family]
            hf = getattr(T, name + "ForCausalLM")(getattr(T, CONFIG_CLASSES.get(family, name + "Config"))(**kw))
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
    blocks = hf.transformer.h if hasattr(hf, "transformer") else hf.gpt_neox.layers if hasattr(hf, "gpt_neox") \
        else getattr(hf.model, "language_model", hf.model).layers
    edited = ("c_proj", "dense_4h_to_h", "fc2", "down_proj")
    seen = {}
    hooks = [next(getattr(b.mlp, n) for n in edited if hasattr(b.mlp, n)).register_forward_pre_hook(
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
def test_family_forward_matches_transformers(ckpt, kind, side, device):
    """float32 logits, MLP keys and layer outputs to 1e-4; the batch (lengths 7, 12, 3, 10) is
    longer than the window-4 kinds' window."""
    path = ckpt(kind)
    hf, ours = hf_load(path).to(device), M.load(path, device)
    L = ours.cfg.n_layers
    ids, mask = (t.to(device) for t in padded_batch(500, side))
    ref, seen = hf_reference(hf, ids, mask)
    assert_matches_hf(ours(ids, mask, keys_at=range(L), outs_at=range(L)), ref, seen, mask, L)


@pytest.mark.parametrize("kind", ["granite", "granite-bias-untied"])
def test_each_of_granites_scalars_moves_the_logits_past_the_parity_tolerance(ckpt, tmp_path, kind):
    """The parity above fails with any one of Granite's four scalars left at 1: each moves the
    logits by over 1e-3 (measured 5.4e-3 to 4.3), ten times the tolerance."""
    ids, mask = padded_batch(500, "right")
    ref, _ = hf_reference(hf_load(ckpt(kind)), ids, mask)
    real = mask.bool()
    for key in M.GRANITE_SCALARS:
        ours = M.load(_config_with(tmp_path / key, ckpt(kind), **{key: 1.0}))
        assert (ours(ids, mask).logits[real] - ref.logits[real]).abs().max() > 1e-3, key


def test_ministral3_scales_its_queries_from_yarns_trained_length_on_as_transformers(ckpt, tmp_path):
    """Ministral 3 scales each query from YaRN's trained length n on (Llama 4's 1 + β ln(1 + ⌊p / n⌋)):
    with n = 4 the test batches' positions take three scales (the parity tests hold: logits,
    bf16, KV cache); greedy generation equals transformers'; without the scale (β = 0) the
    logits move from position n on; a rope without β or n is refused (transformers' forward
    fails on it)."""
    d = ckpt("ministral3")
    assert M.load(d).cfg.query_scale == (0.1, 4)
    ids, mask = padded_batch(500, "right")
    ref, _ = hf_reference(hf_load(d), ids, mask)
    unscaled = M.load(_config_with(tmp_path / "b", d, rope_parameters=dict(MINISTRAL3_ROPE, llama_4_scaling_beta=0.0)))
    gap = (unscaled(ids, mask).logits - ref.logits).abs().amax(-1)[1]       # row 1: 12 real tokens
    assert gap[:4].max() < 1e-4 < gap[4:].min()
    prompt = [5, 6, 7]
    ours = M.generate(M.load(d), [prompt], 8, stop_at_eos=False)[0]
    theirs = hf_load(d).generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)[0, 3:].tolist()
    assert ours == theirs
    with pytest.raises(M.CheckpointError, match="a rope without llama_4_scaling_beta and original_max_position"):
        M.read_config(_config_with(tmp_path / "c", d, rope_parameters=dict(MINISTRAL3_ROPE, llama_4_scaling_beta=None)))


def test_a_tied_config_whose_files_store_another_head_reads_it_as_transformers_5(ckpt, tmp_path):
    """Mistral Small 3.1's config.json as released leaves the top-level tie_word_embeddings to its
    default (true) and stores its own head: transformers 5 reads that head, and so does load
    (the logits are transformers'); a stored head equal to the embeddings stays tied."""
    untied = _config_with(tmp_path / "a", ckpt("mistral3-small"), ["tie_word_embeddings"])
    assert M.read_config(untied).tie_embeddings and not M.load(untied).cfg.tie_embeddings
    assert_logits_are_transformers(untied)
    tied = _config_with(tmp_path / "b", ckpt("mistral3"))
    weights = load_file(tied / "model.safetensors")
    weights["language_model.lm_head.weight"] = weights["language_model.model.embed_tokens.weight"].clone()
    save_file(weights, tied / "model.safetensors", metadata={"format": "pt"})
    assert M.load(tied).cfg.tie_embeddings
    assert_logits_are_transformers(tied)


def test_a_tied_config_whose_stored_head_differs_past_its_first_row_reads_it_as_transformers_5(tmp_path):
    """A stored head equal to the embeddings in its first rows only is another head: transformers 5
    reads it (and warns), and so does load."""
    path = make_hf_checkpoint(tmp_path / "m", "llama-gqa-tied")
    weights = load_file(path / "model.safetensors")
    head = weights["model.embed_tokens.weight"].clone()
    head[5:] += 0.5 * torch.randn_like(head[5:])
    save_file(weights | {"lm_head.weight": head}, path / "model.safetensors", metadata={"format": "pt"})
    m, hf = M.load(path), hf_load(path)
    assert not m.cfg.tie_embeddings and torch.equal(m.head.weight, head) and torch.equal(hf.lm_head.weight, head)
    ids, mask = padded_batch(500, "right")
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
    assert (m(ids, mask).logits - ref)[mask.bool()].abs().max() < 1e-4


def test_configs_read_as_transformers_does(ckpt):
    """The family options land in the config; a window only where transformers applies one."""
    cfg = {k: M.load(ckpt(k)).cfg for k in ("gpt2-bare-unscaled", "qwen2", "qwen2-gqa-tied-window",
                                             "qwen3-gqa-bias", "mistral", "mistral-gqa-window")}
    assert cfg["gpt2-bare-unscaled"].attn_scale == 1.0 and cfg["gpt2-bare-unscaled"].d_mlp == 80
    assert cfg["qwen2"].qkv_bias and not cfg["qwen2"].attention_bias and cfg["qwen2"].sliding_window is None
    assert cfg["qwen2-gqa-tied-window"].window_layers == (1, 2) and cfg["qwen2-gqa-tied-window"].tie_embeddings
    assert cfg["qwen3-gqa-bias"].qk_norm and cfg["qwen3-gqa-bias"].head_dim == 16
    assert cfg["mistral"].window_layers == () and cfg["mistral-gqa-window"].window(0) == 4


@pytest.mark.parametrize("kind", ["gemma", "gemma-gqa-untied", "gemma2", "gemma2-gqa-window-caps", "gemma3",
                                  "gemma3-gqa-window-ropes"])
def test_gemma_configs_read_as_transformers_does(ckpt, kind):
    """Gemma's options as transformers reads them: head_dim from config.json, embeddings scaled by
    sqrt(hidden_size), the head tied unless config.json unties it; Gemma 2's attention scale
    query_pre_attn_scalar^-0.5, its two caps, and its window in the layers layer_types slides (by
    default the even ones); Gemma 3's per-head norms and two ropes (the full layers' scaled)."""
    import transformers as T
    hf, cfg = T.AutoConfig.from_pretrained(ckpt(kind)), M.load(ckpt(kind)).cfg
    assert cfg.head_dim == hf.head_dim != cfg.d_model // cfg.n_heads and cfg.embed_scale == hf.hidden_size ** 0.5
    assert cfg.tie_embeddings == hf.tie_word_embeddings and cfg.norm_plus_one and cfg.mlp_act == "gelu_pytorch_tanh"
    if kind.startswith("gemma3"):
        rope = hf.rope_parameters
        assert cfg.qk_norm and (cfg.rope_theta, cfg.local_rope_theta) == \
            (rope["full_attention"]["rope_theta"], rope["sliding_attention"]["rope_theta"])
        assert (cfg.rope_scaling or {}).get("factor", 1.0) == rope["full_attention"].get("factor", 1.0)
    if kind.startswith(("gemma2", "gemma3")):
        assert cfg.post_norms and cfg.attn_scale == hf.query_pre_attn_scalar ** -0.5
        assert (cfg.attn_softcap, cfg.final_softcap) == (hf.attn_logit_softcapping, hf.final_logit_softcapping)
        assert [cfg.window(i) for i in range(cfg.n_layers)] == \
            [hf.sliding_window if k == "sliding_attention" else None for k in hf.layer_types]
    else:
        assert not cfg.post_norms and (cfg.attn_softcap, cfg.final_softcap, cfg.window_layers) == (None, None, ())


@pytest.mark.parametrize("kind,drop,change", [
    ("gemma", [], dict(hidden_act="gelu")),     # Gemma's releases say "gelu", which transformers reads as tanh
    ("gemma2-gqa-window-caps", ["layer_types", "sliding_window", "attn_logit_softcapping",
                                "final_logit_softcapping", "query_pre_attn_scalar", "hidden_activation"], {}),
    # Gemma 3 as released (transformers 4 wrote its ropes flat: rope_theta, rope_local_base_freq,
    # rope_scaling; the sliding layers by sliding_window_pattern) ...
    ("gemma3-gqa-window-ropes", ["rope_parameters", "layer_types", "_sliding_window_pattern"],
     dict(rope_theta=1e4, rope_local_base_freq=100.0, rope_scaling={"rope_type": "linear", "factor": 8.0},
          sliding_window_pattern=3)),
    # ... and with everything left to the defaults
    ("gemma3", ["rope_parameters", "layer_types", "_sliding_window_pattern", "sliding_window", "attn_logit_softcapping",
                "final_logit_softcapping", "query_pre_attn_scalar", "hidden_activation"], {}),
])
def test_gemma_config_json_left_to_defaults_reads_as_transformers_does(ckpt, tmp_path, kind, drop, change):
    """config.json as released or with Gemma 2's or 3's options left out: transformers' defaults
    (Gemma 2: the window on the even layers, caps 50 and 30, scale 256^-0.5; Gemma 3: the window
    on five layers in six, ropes 1e6 and 1e4, no caps), and its logits."""
    d = _config_with(tmp_path, ckpt(kind), drop, **change)
    cfg = M.read_config(d)
    if kind.startswith("gemma2"):
        assert cfg.window_layers == (0, 2) and cfg.sliding_window == 4096
        assert (cfg.attn_softcap, cfg.final_softcap, cfg.attn_scale) == (50.0, 30.0, 1 / 16)
    if kind == "gemma3-gqa-window-ropes":
        assert cfg == M.read_config(ckpt(kind))             # the same model as transformers 5 writes it
    if kind == "gemma3":
        assert (cfg.window_layers, cfg.sliding_window, cfg.rope_theta, cfg.local_rope_theta) == ((0, 1, 2), 4096, 1e6, 1e4)
        assert (cfg.attn_softcap, cfg.final_softcap, cfg.attn_scale, cfg.rope_scaling) == (None, None, 1 / 16, None)
    assert_logits_are_transformers(d)


def assert_logits_are_transformers(d: Path):
    """Our float32 logits of checkpoint `d` on a left-padded batch equal transformers' to 1e-4."""
    ids, mask = padded_batch(500, "left")
    ref, _ = hf_reference(hf_load(d), ids, mask)
    assert (M.load(d)(ids, mask).logits - ref.logits)[mask.bool()].abs().max() < 1e-4


@pytest.mark.parametrize("kind,drop,change", [
    # GPT-NeoX as Pythia and GPT-NeoX-20B are released (transformers 4 wrote the rope flat) ...
    ("gpt-neox-sequential", ["rope_parameters"], dict(rotary_pct=0.5, rotary_emb_base=100)),
    # ... and with everything left to the defaults (a quarter of each head at base 1e4, parallel,
    # the erf GELU, biases on attention, untied: the kind's values)
    ("gpt-neox", ["rope_parameters", "use_parallel_residual", "hidden_act", "attention_bias",
                  "tie_word_embeddings"], {}),
    # Phi-3.5-mini's and Phi-4-mini's spelling: rope_scaling with LongRoPE's older name "su",
    # partial_rotary_factor and rope_theta at the top level
    ("phi3-longrope-window", ["rope_parameters"],
     dict(rope_scaling={"type": "su", "short_factor": PHI_LONGROPE["short_factor"],
                        "long_factor": PHI_LONGROPE["long_factor"]}, partial_rotary_factor=0.75, rope_theta=10000.0)),
    # Phi-1.5's and Phi-2's: the rope at the top level, the older resid_pdrop key; and a config.json
    # without partial_rotary_factor (transformers' default, half of each head: the kind's)
    ("phi", ["rope_parameters"], dict(partial_rotary_factor=0.5, rope_theta=10000.0, rope_scaling=None,
                                      resid_pdrop=0.1)),
    ("phi", ["rope_parameters"], {}),
    # OLMo 3's (7B, 32B) spelling: rope_theta and the full layers' YaRN at the top level, the
    # layer kinds listed; and with the kinds and the rope base left to the defaults (three
    # sliding layers in four, 5e5: the kind's)
    ("olmo3", ["rope_parameters"], dict(rope_theta=5e5, rope_scaling=KINDS["olmo3"][1]["rope_scaling"])),
    ("olmo3", ["rope_parameters", "layer_types"], dict(rope_scaling=KINDS["olmo3"][1]["rope_scaling"])),
    # YaRN as Qwen2.5's model cards tell to add it (its kind under "type") and as Qwen3's ("rope_type")
    ("qwen2-yarn", ["rope_parameters"], dict(rope_theta=100.0, rope_scaling=dict(
        type="yarn", factor=4.0, original_max_position_embeddings=256))),
    ("qwen2-yarn", ["rope_parameters"], dict(rope_theta=100.0, rope_scaling=dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=256))),
    # ... its trained length at the top level (transformers 5 takes it from there)
    ("qwen2-yarn", ["rope_parameters"], dict(rope_theta=100.0, original_max_position_embeddings=256,
                                             rope_scaling=dict(rope_type="yarn", factor=4.0))),
    # ... and a stray rope_theta beside rope_parameters' (transformers 5 reads the latter)
    ("qwen2-yarn", [], dict(rope_theta=5.0)),
    # OLMo 3 with the layer kinds and a flat rope_scaling beside them: transformers 5 updates the
    # full layers' rope with it
    ("olmo3", [], dict(rope_scaling=dict(beta_fast=32))),
    # GLM-4-0414's spelling (partial_rotary_factor and rope_theta at the top level), and GLM-4-9B's
    # with the share left to the default (half of each head)
    ("glm4", ["rope_parameters"], dict(partial_rotary_factor=0.5, rope_theta=10000.0)),
    ("glm", ["rope_parameters"], dict(rope_theta=10000.0)),
    # SmolLM3-3B's spelling (rope_theta at the top level, no_rope_layers listed, no window), and
    # everything left to the defaults (base 2e6, NoPE every fourth layer, tied: the kind's values)
    ("smollm3", ["rope_parameters", "layer_types"], dict(rope_theta=2e6, rope_scaling=None, no_rope_layers=[1, 1, 1, 0],
                                                          no_rope_layer_interval=4, use_sliding_window=False,
                                                          sliding_window=None, max_window_layers=28)),
    ("smollm3", ["rope_parameters", "no_rope_layers", "no_rope_layer_interval", "layer_types",
                 "tie_word_embeddings"], {}),
    # a window with the layer kinds left out: by default in the NoPE layers
    ("smollm3-nope-window-bias", ["layer_types"], {}),
])
def test_config_json_as_released_reads_as_transformers_5_writes_it(ckpt, tmp_path, kind, drop, change):
    """The releases' spellings (and options left to the defaults) read as the same model as
    config.json written by transformers 5, with transformers' logits."""
    d = _config_with(tmp_path, ckpt(kind), drop, **change)
    assert M.read_config(d) == M.read_config(ckpt(kind))
    assert_logits_are_transformers(d)


@pytest.mark.parametrize("family", [f for f in M.SUPPORTED if f not in ("gemma3", "mistral3")])   # (image-text: text_config)
def test_a_config_json_left_to_the_defaults_reads_as_transformers(family):
    """Sizes only (the rest left to the defaults): the key-value heads, the head size, the positions, the
    padding id, the norm's eps, the tied head, the rope base, the MLP's activation, the biases,
    the window's layers and Granite's and GPT-2's attention scale are transformers' config class's
    (SmolLM3's and Qwen's positions were 2048 here, refusing prompts transformers takes). Not the
    BOS and EOS: the tokenizer's where config.json names none (a config class's default EOS is
    not what transformers' generate stops at)."""
    import transformers as T
    gpt = family in ("gpt2", "gptj")
    sizes = dict(n_embd=512, n_layer=12, n_head=4) if gpt else dict(      # (GPT-J: 64 rotary dims of 128)
        hidden_size=512, intermediate_size=96, num_hidden_layers=12, num_attention_heads=64)   # 64: no default's count
    sizes["vocab_size"] = 512
    cfg = M.Config.from_hf(dict(model_type=family, **sizes))
    theirs = T.AutoConfig.for_model(family, **sizes)
    first = lambda *keys: next(getattr(theirs, k) for k in keys if getattr(theirs, k, None) is not None)
    assert cfg.n_kv_heads == first("num_key_value_heads", "num_attention_heads", "n_head")
    assert cfg.max_positions == first("max_position_embeddings", "n_positions")
    assert cfg.pad_id == theirs.pad_token_id
    assert (cfg.bos_id, cfg.eos_ids) == ((2, [1]) if family == "gemma3_text" else (None, []))   # its defaults name them
    assert cfg.norm_eps == (1e-5 if family == "olmo" else                # (OLMo's: in its code, no key)
                            first("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon"))
    assert cfg.tie_embeddings == theirs.tie_word_embeddings
    rope = getattr(theirs, "rope_parameters", None) or {}
    assert cfg.rope_theta == rope.get("rope_theta", rope.get("full_attention", {}).get("rope_theta", cfg.rope_theta))
    assert cfg.head_dim == (getattr(theirs, "head_dim", None) or 512 // first("num_attention_heads", "n_head"))
    act = first("hidden_activation", "hidden_act", "activation_function")
    if family != "gpt2":                                 # (GPT-2's MLP: gelu_new, read_gpt2's check)
        assert cfg.mlp_act == M.GELU_ACTIVATIONS.get(act, act)
    if (bias := getattr(theirs, "attention_bias", getattr(theirs, "use_qkv_bias", None))) is not None:
        assert (cfg.attention_bias or cfg.qkv_bias) == bias
    assert cfg.mlp_bias == getattr(theirs, "mlp_bias", cfg.mlp_bias)
    kinds = getattr(theirs, "layer_types", None) or ["sliding_attention"] * 12      # (Mistral: every layer)
    assert [cfg.window(i) for i in range(12)] == \
        [getattr(theirs, "sliding_window", None) if k == "sliding_attention" else None for k in kinds]
    if family == "granite":
        assert (cfg.embedding_multiplier, cfg.attn_scale, cfg.residual_multiplier, cfg.logits_scaling) == \
            tuple(getattr(theirs, k) for k in M.GRANITE_SCALARS)
    if family == "gpt2":
        assert (cfg.attn_scale is None) == theirs.scale_attn_weights
    if family == "gptj":                                 # (the whole head was turned: 128, not their 64)
        assert cfg.rotary_dim == theirs.rotary_dim == 64
    if (share := rope.get("partial_rotary_factor")) is not None:     # the share of each head rope turns
        assert (cfg.rotary_dim or cfg.head_dim) == int(cfg.head_dim * share), (cfg.rotary_dim, share)


def test_gemma3_text_config_left_empty_reads_transformers_sizes():
    """Gemma 3's image-text releases' text_config names only what differs from Gemma3TextConfig's
    defaults: those left out are its; the special ids at the top level win over text_config's."""
    import transformers as T
    ours, text = M.Config.from_hf(dict(model_type="gemma3", text_config={})), T.Gemma3Config().text_config
    assert (ours.vocab_size, ours.d_model, ours.d_mlp, ours.n_layers, ours.n_heads, ours.n_kv_heads, ours.head_dim,
            ours.max_positions, ours.norm_eps, ours.sliding_window, ours.attn_scale) == \
        (text.vocab_size, text.hidden_size, text.intermediate_size, text.num_hidden_layers, text.num_attention_heads,
         text.num_key_value_heads, text.head_dim, text.max_position_embeddings, text.rms_norm_eps, text.sliding_window,
         text.query_pre_attn_scalar ** -0.5)
    top = M.Config.from_hf(dict(model_type="gemma3", text_config=dict(eos_token_id=1, bos_token_id=5), eos_token_id=[1, 106]))
    assert (top.eos_ids, top.bos_id) == ([1, 106], 5)        # (the releases' end of turn, 106, at the top level)


@pytest.mark.parametrize("kind", ["glm", "glm4"])
def test_glm_reads_its_rotary_share_and_rope_base_where_transformers_5_does(ckpt, tmp_path, kind):
    """A share and a base inside a flat rope_scaling (transformers 5 takes it as rope_parameters:
    a quarter of each head here, not the top-level half), and a null share (the whole head)."""
    scaling = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=8, partial_rotary_factor=0.25,
                   rope_theta=100.0)
    d = _config_with(tmp_path / "a", ckpt(kind), ["rope_parameters"], rope_theta=5.0, partial_rotary_factor=0.5,
                     rope_scaling=scaling)
    assert (M.read_config(d).rotary_dim, M.read_config(d).rope_theta) == (4, 100.0)
    assert_logits_are_transformers(d)
    d = _config_with(tmp_path / "b", ckpt(kind), ["rope_parameters"], rope_theta=1e4, partial_rotary_factor=None)
    assert M.read_config(d).rotary_dim == 16
    assert_logits_are_transformers(d)


def test_refusals_inside_text_config_say_so_and_gptj_s_rotary_dims_are_checked():
    """An image-text checkpoint's language model is read from text_config, with every check a
    config.json gets: its refusals named config.json's top level (and for Mistral 3 a model_type
    the file lacks). GPT-J without rotary_dim took the whole head where transformers takes 64; an
    odd, null or oversized one ran."""
    small = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=100)
    for c, message in [
            (dict(model_type="mistral3", text_config=dict(hidden_size=64)),
             r"^config.json's text_config \(mistral3: model_type 'mistral'\) lacks the field 'num_hidden_layers'$"),
            (dict(model_type="gemma3", text_config=small | dict(hidden_activation="silu")),
             r"^config.json's text_config \(gemma3: model_type 'gemma3_text'\): hidden_activation 'silu' is not supported"),
            (dict(model_type="gemma3", text_config=small | dict(num_attention_heads=0)),       # (the size checks too)
             r"^config.json's text_config \(gemma3: model_type 'gemma3_text'\): num_attention_heads 0 is not a whole"),
            (dict(model_type="gemma3", text_config=small, bos_token_id="x"),                  # the top level's own
             r"^config.json \(model_type 'gemma3'\): bos_token_id 'x' is not supported"),
            (dict(model_type="gptj", n_embd=64, n_layer=2, n_head=4, vocab_size=100, rotary_dim=5),
             r"rotary_dim 5 is not supported \(rope turns an even number of the 16 head dims, at least 2\)"),
            (dict(model_type="gptj", n_embd=64, n_layer=2, n_head=4, vocab_size=100),
             r"rotary_dim 64 \(transformers' default where config.json has none\) is not supported"),
            (dict(model_type="gptj", n_embd=64, n_layer=2, n_head=4, vocab_size=100, rotary_dim=None),
             r"rotary_dim None is not supported"),                            # (transformers refuses it too)
            (dict(model_type="gptj", n_embd=64, n_layer=2, n_head=3, vocab_size=100, rotary_dim=8),
             r"the hidden size 64 is not divisible by the 3 attention heads")]:
        with pytest.raises(M.CheckpointError, match=message):
            M.Config.from_hf(c)


@pytest.mark.parametrize("text_type", ["mistral", "ministral3"])
def test_mistral3_text_config_left_to_the_defaults_reads_as_transformers(text_type):
    """Mistral 3's text_config naming only sizes reads as transformers' Mistral3Config reads it:
    the text model's own defaults (Ministral 3: YaRN ×16 from 16,384 positions, no window, head_dim
    128), the head tied by the top-level default."""
    import transformers as T
    sizes = dict(model_type=text_type, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=16, vocab_size=512)          # (the default 8 key-value heads share them)
    ours, theirs = M.Config.from_hf(dict(model_type="mistral3", text_config=sizes)), T.Mistral3Config(text_config=sizes)
    text, rope = theirs.text_config, theirs.text_config.rope_parameters
    assert (ours.n_kv_heads, ours.head_dim, ours.norm_eps, ours.max_positions, ours.pad_id, ours.sliding_window) == \
        (text.num_key_value_heads, text.head_dim, text.rms_norm_eps, text.max_position_embeddings, text.pad_token_id,
         text.sliding_window)
    assert ours.tie_embeddings == theirs.tie_word_embeddings and ours.rope_theta == rope["rope_theta"]
    assert (ours.rope_scaling or {}).get("factor") == rope.get("factor")
    assert ours.query_scale == ((rope["llama_4_scaling_beta"], rope["original_max_position_embeddings"])
                                if text_type == "ministral3" else None)
    if text_type == "ministral3":                 # the whole default YaRN (betas, mscales), bit for bit
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
        inv, factor = ROPE_INIT_FUNCTIONS["yarn"](text, "cpu")
        assert torch.equal(M.rope_inv_freq(ours), inv) and ours.rope_attention_factor == factor


def test_olmo3_defaults_are_transformers():
    """A config.json naming only sizes reads as transformers' Olmo3Config defaults: a window of
    4096 on three layers in four, rope 5e5 on both kinds, unscaled; OLMo 2's eps 1e-5."""
    import transformers as T
    sizes = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=8, num_attention_heads=4)
    cfg, theirs = M.Config.from_hf(dict(model_type="olmo3", **sizes)), T.Olmo3Config(**sizes)
    assert cfg.sliding_window == theirs.sliding_window == 4096
    assert [cfg.window(i) is not None for i in range(8)] == [t == "sliding_attention" for t in theirs.layer_types]
    assert (cfg.rope_theta, cfg.local_rope_theta, cfg.rope_scaling, cfg.norm_eps) == (5e5, 5e5, None, theirs.rms_norm_eps)
    assert theirs.rope_parameters == {k: {"rope_type": "default", "rope_theta": 5e5} for k in ("full_attention", "sliding_attention")}


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
@pytest.mark.parametrize("use", [True, False])
def test_qwen_windows_left_to_max_window_layers_are_transformers(family, use):
    """A Qwen config.json with use_sliding_window and no layer_types: the window is in the layers
    from max_window_layers on (here 1, 2, 3 of 4), as transformers' config class marks them;
    without use_sliding_window (Qwen2.5's releases name a sliding_window beside false) none."""
    import transformers as T
    sizes = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, use_sliding_window=use, sliding_window=4, max_window_layers=1)
    cfg, theirs = M.Config.from_hf(dict(model_type=family, **sizes)), T.AutoConfig.for_model(family, **sizes)
    assert [cfg.window(i) for i in range(4)] == [theirs.sliding_window if t == "sliding_attention" else None
                                                 for t in theirs.layer_types]
    assert [cfg.window(i) for i in range(4)] == ([None, 4, 4, 4] if use else [None] * 4)


@pytest.mark.parametrize("rope", [
    # DeepSeek's attention factor: the ratio of two mscales (0.1 · 1.0 · ln 4 + 1 over 0.1 · 0.5 · ln 4 + 1)
    dict(factor=4.0, original_max_position_embeddings=256, mscale=1.0, mscale_all_dim=0.5),
    # base 10, 1000 trained positions: the slow end (dim 17.6) clamped to the last dim (15), the ramp
    # from dim 5 reaching the 8 frequencies
    dict(factor=2.0, original_max_position_embeddings=1000, rope_theta=10.0),
    # an attention factor given apart from the derived 0.1 ln 4 + 1
    dict(factor=4.0, original_max_position_embeddings=256, attention_factor=0.9),
])
def test_yarn_edge_cases_are_transformers_to_the_bit(rope):
    """YaRN's frequencies and attention factor equal those of transformers' own function (its
    config class reading the same config.json) where the qwen2-yarn and olmo3 checkpoints never
    go: mscale beside mscale_all_dim, a ramp clamped at the last dim."""
    import transformers as T
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    c = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=400_000,
             rope_parameters=dict(rope_type="yarn", rope_theta=100.0) | rope)
    cfg = M.Config.from_hf(dict(model_type="qwen2", **c))
    inv, factor = ROPE_INIT_FUNCTIONS["yarn"](T.Qwen2Config(**c), "cpu")
    assert torch.equal(M.rope_inv_freq(cfg), inv)
    assert cfg.rope_attention_factor == factor


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_qwen_windows_left_to_the_default_max_window_layers_are_transformers(family):
    """use_sliding_window without max_window_layers or layer_types: transformers' default (28)
    puts the window in layers 28 to 31 of 32."""
    import transformers as T
    sizes = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=32, num_attention_heads=4,
                 num_key_value_heads=2, use_sliding_window=True, sliding_window=4)
    cfg, theirs = M.Config.from_hf(dict(model_type=family, **sizes)), T.AutoConfig.for_model(family, **sizes)
    assert [cfg.window(i) for i in range(32)] == [4 if t == "sliding_attention" else None for t in theirs.layer_types]
    assert cfg.window_layers == (28, 29, 30, 31)


@pytest.mark.parametrize("kind", ["qwen2-yarn", "olmo3"])
def test_yarn_is_transformers_to_the_bit_and_each_part_matters(ckpt, kind):
    """YaRN's frequencies and attention factor equal transformers' bit for bit (on OLMo 3 the full
    layers'; its sliding layers turn unscaled, at their own base), and each part matters: plain
    frequencies (no ramp, no slowing) or cos and sin left unscaled move the logits far past the
    parity's tolerance."""
    m, rotary = M.load(ckpt(kind)), hf_load(ckpt(kind)).model.rotary_emb
    full = "" if kind == "qwen2-yarn" else "full_attention_"
    assert torch.equal(m.inv_freq, getattr(rotary, f"{full}inv_freq"))
    assert m.cfg.rope_attention_factor == getattr(rotary, f"{full}attention_scaling")
    if kind == "olmo3":
        assert torch.equal(m.inv_freq_local, rotary.sliding_attention_inv_freq)
        assert rotary.sliding_attention_attention_scaling == 1.0
    ids, mask = padded_batch(500, "left")
    ours = m(ids, mask).logits
    plain = 1.0 / m.cfg.rope_theta ** (torch.arange(0, m.cfg.head_dim, 2).float() / m.cfg.head_dim)
    assert not torch.equal(plain, m.inv_freq)
    yarn, scaling = m.inv_freq.clone(), m.cfg.rope_scaling
    try:
        m.inv_freq = plain
        assert (m(ids, mask).logits - ours)[mask.bool()].abs().max() > 0.01       # 100 times the tolerance
        m.inv_freq, m.cfg.rope_scaling = yarn, None                               # no attention factor
        assert (m(ids, mask).logits - ours)[mask.bool()].abs().max() > 0.01
    finally:
        m.inv_freq, m.cfg.rope_scaling = yarn, scaling


@pytest.mark.parametrize("given", [{}, dict(attention_factor=0.9)])
def test_phi3_longrope_left_to_the_defaults_is_transformers(given):
    """LongRoPE without config.json's original_max_position_embeddings: transformers' 4096 (the
    switch to the long factors and the attention factor's length); an attention factor given is taken."""
    import transformers as T
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    c = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=16384, rope_parameters=PHI_LONGROPE | given | dict(rope_theta=1e4,
                                                                                        partial_rotary_factor=0.75))
    cfg, theirs = M.Config.from_hf(dict(model_type="phi3", **c)), T.Phi3Config(**c)
    assert cfg.longrope_switch == theirs.original_max_position_embeddings == 4096
    assert cfg.rope_attention_factor == ROPE_INIT_FUNCTIONS["longrope"](theirs, "cpu")[1]


@pytest.mark.parametrize("length", [6, 8, 9])
def test_phi3_longrope_takes_the_long_factors_past_the_trained_length_as_transformers_does(ckpt, length):
    """A pass whose positions stay within original_max_position_embeddings (8) turns q and k by
    the short factors, one past it by the long ones (for all its positions, as transformers
    decides per pass); both scaled by the attention factor sqrt(1 + ln 8 / ln 8). Each choice
    matters: the other factors move the logits far past the tolerance."""
    m = M.load(ckpt("phi3-longrope-window"))
    assert m.cfg.rope_scaling["attention_factor"] == 2 ** 0.5
    ids = torch.randint(3, 500, (2, length), generator=torch.Generator().manual_seed(length))
    mask = torch.ones_like(ids)
    ref, _ = hf_reference(hf_load(ckpt("phi3-longrope-window")), ids, mask)
    ours = m(ids, mask).logits
    assert (ours - ref.logits).abs().max() < 1e-4
    short, long = m.inv_freq.clone(), m.inv_freq_long.clone()
    m.inv_freq, m.inv_freq_long = long, short                 # the other factors in each regime
    try:
        assert (m(ids, mask).logits - ours).abs().max() > 0.02      # 200 times the parity's tolerance
    finally:
        m.inv_freq, m.inv_freq_long = short, long


def test_phi3_longrope_generation_past_the_trained_length_is_transformers(ckpt):
    """Decoding past original_max_position_embeddings (8): the first pass past it turns every key
    again by the long factors (transformers' Phi-3 drops its cache there), so cached decoding
    equals re-running the sequence per token and transformers' generate; a cached pass that would
    mix the two (keys of the short factors, a query of the long) is refused by name."""
    m, hf = M.load(ckpt("phi3-longrope-window")), hf_load(ckpt("phi3-longrope-window"))
    prompt = [1, 5, 9, 33, 7]
    got = M.generate(m, [prompt], 8, stop_at_eos=False)[0]
    seq = list(prompt)
    for _ in range(8):
        seq.append(int(m(torch.tensor([seq])).logits[0, -1].argmax()))
    assert seq[len(prompt):] == got
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ref[0, len(prompt):].tolist() == got
    cache = M.KVCache(m.cfg, 1, 12, "cpu", torch.float32)
    m(torch.tensor([seq[:8]]), cache=cache)
    with pytest.raises(ValueError, match="cached keys were turned by the short ones"):
        m(torch.tensor([seq[8:9]]), torch.ones(1, 9, dtype=torch.long), cache=cache)


def test_only_longrope_scales_cos_and_sin_by_an_attention_factor(tmp_path):
    """An attention_factor beside another rope's fields (a Llama-3.1 rope_scaling) scales nothing,
    as in transformers, which warns of the unknown key and applies no scaling."""
    src = make_hf_checkpoint(tmp_path / "m", "llama-gqa-rope3")
    rope = json.loads((src / "config.json").read_text())["rope_scaling"]
    d = _config_with(tmp_path, src, rope_scaling=rope | {"attention_factor": 2.0})
    ids, mask = padded_batch(500, "left")
    assert torch.equal(M.load(d)(ids, mask).logits, M.load(src)(ids, mask).logits)


def test_a_gpt_neox_head_saved_under_transformers_5s_name_loads(ckpt, tmp_path):
    """transformers 5 names GPT-NeoX's head lm_head inside and writes it so where it saves without
    save_original_format (an offloaded or PEFT model): read as embed_out, the same logits."""
    d = tmp_path / "ckpt"
    shutil.copytree(ckpt("gpt-neox"), d)
    tensors = load_file(d / "model.safetensors")
    tensors["lm_head.weight"] = tensors.pop("embed_out.weight")
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    ids, mask = padded_batch(500, "right")
    assert torch.equal(M.load(d)(ids, mask).logits, M.load(ckpt("gpt-neox"))(ids, mask).logits)


def test_gemma2_caps_and_window_change_the_logits(ckpt):
    """The parity tests mean something: on the test batch, each of Gemma 2's attention cap, final
    cap and window (of the kind that sets them small) moves the logits far past their tolerance."""
    m = M.load(ckpt("gemma2-gqa-window-caps"))
    ids, mask = padded_batch(500, "left")
    real = mask.bool()
    base = m(ids, mask).logits[real]
    for option, off in (("attn_softcap", None), ("final_softcap", None), ("window_layers", ())):
        on = getattr(m.cfg, option)
        setattr(m.cfg, option, off)
        moved = (m(ids, mask).logits[real] - base).abs().max()
        setattr(m.cfg, option, on)
        assert moved > 0.05, (option, float(moved))


@pytest.mark.parametrize("kind", ["gpt2", "gemma", "granite"])
def test_a_pass_from_a_layers_output_is_the_whole_pass(ckpt, kind):
    """start=(layer, h) runs the blocks above from the residual h as it is: what the embeddings
    take (GPT-2's learned positions, Gemma's sqrt(d), Granite's multiplier) is in h already."""
    m = M.load(ckpt(kind))
    ids, mask = padded_batch(500, "left")
    full = m(ids, mask, outs_at={0})
    assert torch.equal(m(ids, mask, start=(0, full.outs[0])).logits, full.logits)


@pytest.mark.parametrize("kind", ["mistral-gqa-window", "qwen2-gqa-tied-window"])
@pytest.mark.parametrize("window", ["absent", None])
def test_a_sliding_window_left_out_is_that_of_transformers(ckpt, tmp_path, kind, window):
    """config.json without sliding_window: transformers' default window of 4096 tokens (Mistral;
    Qwen with use_sliding_window), in the layers it slides; an explicit null: no window."""
    import transformers as T
    d = _config_with(tmp_path, ckpt(kind), ["sliding_window"], **({} if window == "absent" else {"sliding_window": None}))
    hf, cfg = T.AutoConfig.from_pretrained(d), M.read_config(d)
    assert hf.sliding_window == (4096 if window == "absent" else None)
    slides = getattr(hf, "layer_types", None) or ["sliding_attention"] * cfg.n_layers   # Mistral: every layer
    assert [cfg.window(i) for i in range(cfg.n_layers)] == \
        [hf.sliding_window if k == "sliding_attention" else None for k in slides]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["gpt2", "qwen2-gqa-tied-window", "qwen3-gqa-bias", "mistral-gqa-window", "gemma",
                                  "gemma2-gqa-window-caps", "gemma3-gqa-window-ropes", "olmo-clip-gqa-bias", "stablelm", "olmo2", "gpt-neox",
                                  "gpt-neox-sequential", "phi3", "phi3-longrope-window", "phi", "phi-gqa-tied-erf",
                                  "smollm3-nope-window-bias", "olmo3", "qwen2-yarn", "glm", "glm4", "granite",
                                  "granite-bias-untied", "mistral3", "ministral3"])
def test_bfloat16_error_is_that_of_transformers(ckpt, kind, device):
    """In bfloat16 our logits (returned in float32) are as close to the float32 reference as
    transformers' own bfloat16 logits are (mean absolute error within 1.5x of theirs, plus 0.1% of
    the logits' scale); on the CPU the two are bit-identical for the LLaMA-like families (OLMo's
    rope in float32 included)."""
    path = ckpt(kind)
    ids, mask = (t.to(device) for t in padded_batch(500, "left"))
    real = mask.bool()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf_load(path).to(device)(input_ids=ids, attention_mask=mask, position_ids=pos).logits[real]
        hf16 = hf_load(path, torch.bfloat16).to(device)
        theirs = hf16(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()[real]
    ours = M.load(path, device, "bfloat16")(ids, mask).logits
    assert ours.dtype == torch.float32                 # (Output's logits: float32 whatever the weights)
    ours = ours[real]
    err_ours, err_theirs = (ours - ref).abs().mean(), (theirs - ref).abs().mean()
    assert err_theirs > 0                      # the check means something: bf16 does round
    if device == "cpu" and M.read_config(path).llama_like:
        assert torch.equal(ours, theirs), float((ours - theirs).abs().max())     # (OLMo's float32 rope)
    assert err_ours <= 1.5 * err_theirs + 1e-3 * ref.abs().mean(), (float(err_ours), float(err_theirs))


# ============================================================================ generation
@pytest.mark.parametrize("kind", ["gpt2", "qwen2-gqa-tied-window", "qwen3-gqa-bias", "mistral-gqa-window",
                                  "gemma-gqa-untied", "gemma2-gqa-window-caps", "gemma3-gqa-window-ropes", "olmo2",
                                  "gpt-neox", "phi3", "phi-gqa-tied-erf", "smollm3-nope-window-bias",
                                  "olmo3", "qwen2-yarn", "glm4-full-rope-tied", "granite", "ministral3"])
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
    with pytest.raises(ValueError, match="65 tokens is longer than this GPT-2's 64 learned positions"):
        m(ids[:, :65])                            # one past the last position (not an IndexError)


# ============================================================================ edit weights, save
@pytest.mark.parametrize("kind", ["gpt2", "gpt2-bare-unscaled", "qwen2-gqa-tied-window", "qwen3-gqa-bias",
                                  "mistral-gqa-window", "gemma", "gemma2-gqa-window-caps", "gemma3", "gemma3-image-text",
                                  "olmo2", "gpt-neox", "gpt-neox-sequential", "phi3", "phi3-longrope-window", "phi",
                                  "phi-gqa-tied-erf", "smollm3", "smollm3-nope-window-bias", "olmo3", "olmo3-gqa-kinds",
                                  "glm", "glm4", "glm4-full-rope-tied", "granite", "granite-bias-untied",
                                  "ministral3", "mistral3", "mistral3-small"])
def test_family_save_then_load_is_exact_and_transformers_reads_it(ckpt, tmp_path, kind):
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


def test_gemma3_image_text_edits_its_language_model_and_save_keeps_the_vision_tower(ckpt, tmp_path):
    """Gemma 3's image-text checkpoint: text_config's omissions are transformers' Gemma3TextConfig
    defaults; the language model's weights are read under "language_model."; a saved edit changes
    that one tensor and leaves the vision tower and projector bit-identical."""
    import transformers as T
    defaults = T.Gemma3TextConfig()
    assert {k: getattr(defaults, k) for k in M.GEMMA3_TEXT_DEFAULTS} == M.GEMMA3_TEXT_DEFAULTS
    src = ckpt("gemma3-image-text")
    m = M.load(src)
    assert m.edit_weight_name(1) == "language_model.model.layers.1.mlp.down_proj.weight"
    m.edit_weight(1).add_(1.0)
    M.save(src, tmp_path / "out", m.edit_tensors([1]))
    before, after = load_file(src / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert before.keys() == after.keys() and any(k.startswith("vision_tower.") for k in before)
    assert [k for k in before if not torch.equal(before[k], after[k])] == [m.edit_weight_name(1)]


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
    with pytest.raises(M.CheckpointError, match="transformer.h.2.mlp.c_proj.weight has shape"):
        m.load_edit_tensors({"transformer.h.0.mlp.c_proj.weight": torch.zeros(256, 64),   # fine, but
                             "transformer.h.2.mlp.c_proj.weight": torch.zeros(64, 256)})  # this one is not
    assert all(torch.equal(t, saved[n]) for n, t in m.edit_tensors([0, 2]).items())     # nothing copied


@pytest.mark.parametrize("kind", ["gpt2", "qwen3-gqa-bias", "mistral-gqa-window", "gemma2-gqa-window-caps",
                                  "gemma3-gqa-window-ropes", "olmo2", "gpt-neox", "phi3-longrope-window", "phi",
                                  "smollm3", "olmo3", "glm4", "granite", "mistral3"])     # (a k bias is inert in a NoPE layer: no bias here)
def test_names_through_layer_are_exactly_what_the_layer_depends_on(ckpt, kind):
    """Perturbing any tensor outside names_through_layer(1) leaves layer 1's output unchanged;
    perturbing any one inside changes it; the names are the checkpoint's."""
    m = M.load(ckpt(kind))
    names = m.names_through_layer(1)
    assert set(names) <= set(M.weight_files(ckpt(kind)))
    assert not any(".2." in n or "norm.weight" == n.split("model.")[-1] or "ln_f" in n or "final_layer" in n
                   for n in names)
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


def test_a_quantization_config_left_in_a_float_checkpoint_loads_and_the_plan_says_what_it_counts(tmp_path, capsys):
    """QLoRA/Unsloth merges saved in 16 bits keep bitsandbytes' quantization_config in config.json:
    their float tensors load (the tensors' dtypes decide, above); --plan from config.json alone
    counts float weights and says so."""
    d = tmp_path / "merged"
    shutil.copytree(STORIES, d)
    config = json.loads((d / "config.json").read_text())
    quant = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (d / "config.json").write_text(json.dumps(config | {"quantization_config": quant}))
    ids = torch.tensor([[1, 400, 50, 7]])
    assert torch.equal(M.load(d)(ids).logits, M.load(STORIES)(ids).logits)
    import lyaplock as L
    (d / "model.safetensors").unlink()
    assert L.main(["--plan", "--model", str(d), "--layers", "1,2"]) == 0
    assert "config.json has a quantization_config (bitsandbytes): planned as float weights" in capsys.readouterr().out


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


def _config_with(tmp_path, ckpt_dir, drop=(), **change):
    """A copy of the checkpoint whose config.json lacks the keys `drop` and takes `change`."""
    d = tmp_path / "ckpt"
    shutil.copytree(ckpt_dir, d)
    c = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({k: v for k, v in c.items() if k not in drop} | change))
    return d


@pytest.mark.parametrize("kind,change,message", [
    ("gpt2", dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx: true is not supported"),
    ("gpt2", dict(reorder_and_upcast_attn=True), "reorder_and_upcast_attn: true is not supported"),
    ("gpt2", dict(activation_function="relu"), "activation_function 'relu' is not supported"),
    ("gpt2", dict(add_cross_attention=True), "add_cross_attention: true is not supported"),
    ("qwen2", dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
    ("mistral", dict(rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 1e4}),
     "rope_scaling .*only 'llama3', 'yarn' and 'linear'"),
    ("qwen2-yarn", dict(rope_scaling={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 256}),
     "rope_scaling beside rope_parameters is not supported .transformers 5 then takes rope_scaling alone"),
    ("qwen2-yarn", dict(original_max_position_embeddings=64),
     "original_max_position_embeddings 64 beside yarn's 256 is not supported .transformers 5 takes the first"),
    ("qwen3", dict(model_type="mamba"), "unsupported model_type 'mamba'.*'llama', 'gptj', 'gpt2', 'qwen2', "
                                        "'qwen3', 'mistral', 'gemma', 'gemma2', 'gemma3_text', 'gemma3', "
                                        "'olmo', 'olmo2', 'olmo3', 'gpt_neox', 'phi3', 'phi', 'smollm3', 'glm', 'glm4', "
                                        "'granite', 'ministral3', 'mistral3', 'stablelm'"),
    ("gemma", dict(hidden_act="silu"), "hidden_act 'silu' is not supported"),
    ("olmo", dict(clip_qkv=-8.0), r"clip_qkv -8.0 is not supported \(q, k and v are clamped to ±clip_qkv, a positive"),
    ("olmo", dict(clip_qkv=True), r"clip_qkv True is not supported"),
    ("stablelm", dict(use_parallel_residual=True), "use_parallel_residual true is not supported .StableLM 2 12B's"),
    ("stablelm", dict(qk_layernorm=True), "qk_layernorm true is not supported .StableLM 2 12B's"),
    ("gemma", dict(hidden_activation="gelu"), "hidden_activation 'gelu' is not supported"),
    ("gemma2", dict(hidden_activation="gelu"), "hidden_activation 'gelu' is not supported"),
    ("gemma2", dict(use_bidirectional_attention=True), "use_bidirectional_attention: true is not supported"),
    ("gemma2", dict(layer_types=["chunked_attention"] * 4), r"layer_types \['chunked_attention'.* is not supported"),
    ("gemma2", dict(layer_types=["full_attention"] * 3), r"layer_types \['full_attention'.* is not supported"),
    ("gemma2", dict(sliding_window=None), "sliding_window None with sliding_attention layers is not supported"),
    ("qwen2-gqa-tied-window", dict(layer_types=["linear_attention"] * 3), r"layer_types \['linear_attention'"),
    ("gemma3", dict(rope_parameters={"full_attention": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6},
                                     "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
     "rope_scaling .*yarn.* is not supported .Gemma 3's full-attention rope may be linear-scaled"),
    ("gemma3", dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                     "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}),
     "the sliding layers' rope_parameters .* is not supported"),
    ("gemma3", dict(use_bidirectional_attention=True), "use_bidirectional_attention: true is not supported"),
    ("gemma3", dict(rope_parameters=None, rope_scaling={"type": "linear", "factor": 4.0}),
     r"rope_scaling \{'type': 'linear', 'factor': 4.0\} \(its kind under 'type'\) is not supported"),
    ("gemma3", dict(sliding_window=None), "sliding_window None with sliding_attention layers is not supported"),
    ("gpt-neox", dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope scaling .* is not supported .GPT-NeoX's rope is implemented unscaled"),
    ("gpt-neox", dict(hidden_act="relu"), "hidden_act 'relu' is not supported .GPT-NeoX's MLP here is gelu, gelu_fast"),
    ("gpt-neox", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.2}),
     "a rotary share giving 3 of 16 head dims is not supported .rope turns an even number of them"),
    ("phi3", dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}),
     "rope scaling .* is not supported .Phi-3's rope is implemented plain or longrope"),
    ("phi3-longrope-window", dict(rope_parameters=PHI_LONGROPE | {"short_factor": [1.0] * 8, "rope_theta": 1e4,
                                                                  "partial_rotary_factor": 0.75}),
     r"longrope short_factor \[1.0, .*\] is not supported .a list of 6 numbers, one per frequency"),
    ("phi", dict(qk_layernorm=True), "qk_layernorm: true is not supported"),
    ("phi", dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
     "rope scaling .* is not supported .Phi's rope is implemented unscaled"),
    ("phi", dict(hidden_act="relu"), "hidden_act 'relu' is not supported .Phi's MLP here is gelu"),
    ("olmo3", dict(rope_parameters=None, rope_theta=1e4), "rope_theta 10000.0 without rope_parameters is not supported"),
    ("olmo3-gqa-kinds", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4}),
     "rope_parameters .* is not supported .OLMo 3's are given per layer kind"),
    ("olmo3-gqa-kinds", dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e4},
                                              "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}),
     "the sliding layers' rope_parameters .* is not supported .OLMo 3's sliding layers turn unscaled"),
    ("olmo3", dict(rope_parameters=None, rope_theta=5e5, rope_scaling=KINDS["olmo3"][1]["rope_scaling"] | {"truncate": False}),
     "YaRN's truncate false for the full layers is not supported"),
    ("olmo3-gqa-kinds", dict(sliding_window=None), "sliding_window None with sliding_attention layers is not supported"),
    ("qwen2-yarn", dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 100.0}),
     "yarn rope_scaling .* lacks the field 'original_max_position_embeddings'"),
    ("qwen2", dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}),
     "rope_scaling .* is not supported .only 'llama3', 'yarn' and 'linear' are implemented"),
    ("qwen3", dict(max_position_embeddings=None), "max_position_embeddings None is not a number of positions"),
    ("gpt2", dict(n_positions=0), "n_positions 0 is not a number of positions"),
    ("glm4", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.1}),
     "a rotary share giving 1 of 16 head dims is not supported"),
    ("mistral3", dict(text_config=dict(model_type="mistral4")),
     "text_config's model_type 'mistral4' is not supported .Mistral 3's language model here is 'mistral' or 'ministral3'"),
    ("granite", dict(attention_multiplier=None), "attention_multiplier None is not supported .Granite's scalars are finite numbers"),
    ("granite", dict(embedding_multiplier="12"), "embedding_multiplier '12' is not supported"),
    ("smollm3", dict(no_rope_layers=[1, 1, 2, 0]), r"no_rope_layers \[1, 1, 2, 0\] is not supported .a 1 .rope. or 0"),
    ("smollm3", dict(no_rope_layers=[1, 0]), r"no_rope_layers \[1, 0\] is not supported .* each of the 4 layers"),
    ("smollm3-nope-window-bias", dict(use_sliding_window=False),
     "layer_types' sliding_attention without use_sliding_window and sliding_window is not supported"),
    ("gemma3", dict(attn_logit_softcapping=5.0), "attn_logit_softcapping 5.0 is not supported .transformers' Gemma 3 "
                                                 "never caps attention scores"),
    ("gemma2", dict(query_pre_attn_scalar=-4), "query_pre_attn_scalar -4 is not supported"),
    ("qwen3-gqa-bias", dict(num_key_value_heads=3), "4 attention heads do not share 3 key-value heads evenly"),
    ("qwen2", dict(num_key_value_heads=8), "4 attention heads do not share 8 key-value heads evenly"),
    ("gpt2", dict(n_head=5), "the hidden size 64 is not divisible by the 5 attention heads"),
    ("mistral-gqa-window", dict(sliding_window=-1), "sliding_window -1 is not a number of positions"),
    ("phi3-longrope-window", dict(sliding_window=0), "sliding_window 0 is not a number of positions"),
    ("granite", dict(attention_multiplier=0.0), "attn_scale 0.0 is not a positive number"),
    ("qwen2", dict(hidden_size=2), "head_dim 0 is not a whole number of at least 1"),     # (hidden_size // heads)
    ("mistral-gqa-window", dict(sliding_window="4096"), "sliding_window '4096' is not a number of positions"),
    ("qwen2-yarn", dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 100.0,
                                         "original_max_position_embeddings": 0}),
     "yarn rope_scaling's original_max_position_embeddings 0 is not a positive number"),
    # fields of the wrong kind, wherever the reading fails (transformers' config fails likewise)
    ("gemma3", dict(sliding_window_pattern=0, layer_types=None),
     "holds a value that cannot be read as transformers reads it: ZeroDivisionError"),
    ("smollm3", dict(no_rope_layer_interval=0, no_rope_layers=None), "cannot be read .*ZeroDivisionError"),
])
def test_unsupported_options_are_refused(ckpt, tmp_path, kind, change, message):
    with pytest.raises(M.CheckpointError, match=message):
        M.load(_config_with(tmp_path, ckpt(kind), **change))


def test_a_trained_length_at_the_top_level_is_read_as_transformers_5_or_refused_where_it_differs():
    """transformers 5 takes config.json's top-level original_max_position_embeddings over the one in
    a llama3 or YaRN rope_scaling: read so where it stands alone, refused where the two differ
    (earlier versions read the scaling's)."""
    c = dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=256, rope_theta=500000.0)
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    yarn = {"rope_type": "yarn", "factor": 4.0}
    for rope in (llama3, yarn):
        cfg = M.Config.from_hf(c | dict(rope_scaling=rope, original_max_position_embeddings=16))
        assert cfg.rope_scaling["original_max_position_embeddings"] == 16
        with pytest.raises(M.CheckpointError, match=f"original_max_position_embeddings 16 beside {rope['rope_type']}'s 64"):
            M.Config.from_hf(c | dict(rope_scaling=rope | {"original_max_position_embeddings": 64},
                                      original_max_position_embeddings=16))


@pytest.mark.parametrize("layout", ["rope_scaling", "rope_parameters"])
@pytest.mark.parametrize("field", ["factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"])
def test_llama3_rope_without_one_of_its_fields_is_refused_by_name(layout, field):
    """No guessed default: transformers requires the first three and takes the fourth from
    max_position_embeddings (a value a Llama-3.1 config never relies on); 8192 was assumed here."""
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16}
    del rope[field]
    c = dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=256)
    if layout == "rope_scaling":          # Llama-3.1's config.json
        c |= dict(rope_theta=500000.0, rope_scaling=rope)
    else:                                 # as transformers 5 writes it
        c |= dict(rope_parameters=rope | {"rope_theta": 500000.0})
    with pytest.raises(M.CheckpointError, match=f"llama3 rope_scaling .* lacks the field '{field}'"):
        M.Config.from_hf(c)


# ============================================================================ the tokenizer
SENTENCES = ["Once upon a time there was a little girl named Lily.", "She liked to play in the park."]


def added(token: str) -> dict:
    """A special token as tokenizer_config.json spells it with its options."""
    return {"__type": "AddedToken", "content": token, "lstrip": False, "normalized": True, "rstrip": False,
            "single_word": False}


# family -> (model_type, config.json's ids, special tokens (ids 0, 1, 2), the BOS tokenizer.json's
# template adds or None, tokenizer_config.json): each family's real conventions
TOKENIZER_CONVENTIONS = {
    "llama-2": ("llama", dict(bos_token_id=1, eos_token_id=2), ["<unk>", "<s>", "</s>"], "<s>",
                {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True, "add_eos_token": False,
                 "tokenizer_class": "LlamaTokenizer"}),
    "llama-3": ("llama", dict(bos_token_id=0, eos_token_id=1), ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"],
                "<|begin_of_text|>", {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
                                      "tokenizer_class": "PreTrainedTokenizerFast"}),
    # no BOS, though config.json names one (151643, its EOS)
    "qwen2.5": ("qwen2", dict(bos_token_id=0, eos_token_id=0), ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None,
                {"bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                 "add_bos_token": False, "tokenizer_class": "Qwen2Tokenizer"}),
    # config.json's bos_token_id (151643) is the tokenizer's EOS; its BOS is <｜begin▁of▁sentence｜>
    "deepseek-r1-distill-qwen": ("qwen2", dict(bos_token_id=0, eos_token_id=0),
                                 ["<｜end▁of▁sentence｜>", "<｜begin▁of▁sentence｜>", "<|im_start|>"],
                                 "<｜begin▁of▁sentence｜>",
                                 {"bos_token": added("<｜begin▁of▁sentence｜>"),
                                  "eos_token": added("<｜end▁of▁sentence｜>"), "add_bos_token": True,
                                  "add_eos_token": False, "tokenizer_class": "LlamaTokenizerFast"}),
    "gpt2": ("gpt2", dict(bos_token_id=0, eos_token_id=0), ["<|endoftext|>"], None,
             {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
              "tokenizer_class": "GPT2Tokenizer"}),
    # Pythia's (the GPT-NeoX-20B tokenizer): no BOS added, though its bos_token is <|endoftext|>
    "pythia": ("gpt_neox", dict(bos_token_id=0, eos_token_id=0, rotary_pct=0.5), ["<|endoftext|>", "<|padding|>"], None,
               {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                "add_prefix_space": False, "tokenizer_class": "GPTNeoXTokenizer"}),
    # Phi-3-mini-4k's and -medium's (their 2025 files): add_bos_token false, no BOS in the template
    "phi-3-mini": ("phi3", dict(bos_token_id=1, eos_token_id=2), ["<unk>", "<s>", "</s>"], None,
                   {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": False, "tokenizer_class": "LlamaTokenizer"}),
    # tokenizer_config.json silent on add_bos_token (as SmolLM3's, Phi-4's, OLMo's): the template
    # decides, here a BOS first (the rule read Llama's, Mistral's and Gemma's as adding one, no other)
    # and a second special token after it: what a prompt begins with, exactly
    "template-only": ("phi3", dict(eos_token_id=2), ["<unk>", "<s>", "</s>", "<x>"], "<s> <x>",
                      {"bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast"}),
}


def tokenizer_checkpoint(path, model_type, ids, specials, template, tokenizer_config) -> Path:
    """A directory with config.json (a tiny shape; no weights) and a byte-level BPE of 300 tokens
    trained on SENTENCES, the special tokens first; tokenizer.json's post-processor puts
    `template` (special tokens separated by spaces) before a sequence (None: nothing)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(SENTENCES, trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if template is None:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    else:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{template} $A", special_tokens=[(t, tok.token_to_id(t)) for t in template.split()])
    shape = dict(n_embd=8, n_layer=1, n_head=2) if model_type == "gpt2" else \
        dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    path.mkdir(parents=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (path / "config.json").write_text(json.dumps(dict(model_type=model_type, vocab_size=300, **shape, **ids)))
    return path


@pytest.mark.parametrize("family", TOKENIZER_CONVENTIONS)
def test_tokenizer_bos_is_that_of_transformers(tmp_path, family):
    """The BOS is the tokenizer's own (tokenizer_config.json's bos_token), not config.json's; prompts
    encode as transformers' AutoTokenizer encodes them, and a BOS asked for is its BOS or none."""
    import transformers as T
    d = tokenizer_checkpoint(tmp_path / family, *TOKENIZER_CONVENTIONS[family])
    ours, theirs = M.Tokenizer(d, M.read_config(d)), T.AutoTokenizer.from_pretrained(d)
    assert ours.bos_id == theirs.bos_token_id
    bos = [] if theirs.bos_token_id is None else [theirs.bos_token_id]
    for text in [SENTENCES[0], ""]:
        assert ours.encode(text) == theirs(text)["input_ids"]
        assert ours.encode(text, bos=True) == bos + theirs(text, add_special_tokens=False)["input_ids"]
        assert ours.encode(text, bos=False) == theirs(text, add_special_tokens=False)["input_ids"]


def test_a_template_inside_a_sequence_post_processor_gives_the_lead(tmp_path):
    """Llama 3's tokenizer.json: its TemplateProcessing (BOS before the text) inside a Sequence
    after a ByteLevel; the lead is that BOS, and prompts encode as transformers encodes them."""
    import transformers as T
    d = tokenizer_checkpoint(tmp_path / "t", "llama", dict(bos_token_id=1, eos_token_id=2), ["<unk>", "<s>", "</s>"],
                             "<s>", {"bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast"})
    tj = json.loads((d / "tokenizer.json").read_text())
    tj["post_processor"] = {"type": "Sequence", "processors": [
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}, tj["post_processor"]]}
    (d / "tokenizer.json").write_text(json.dumps(tj))
    ours, theirs = M.Tokenizer(d, M.read_config(d)), T.AutoTokenizer.from_pretrained(d)
    assert ours.lead == [1]
    for text in (SENTENCES[0], ""):
        assert ours.encode(text) == theirs(text)["input_ids"]


def test_a_special_token_the_template_puts_after_the_text_is_not_added(tmp_path):
    """A template "<s> $A </s>" (a tokenizer that ends every text): a prompt begins with its BOS, as
    transformers encodes it, and the EOS after it is left out (a prompt is to be continued)."""
    import transformers as T
    d = tokenizer_checkpoint(tmp_path / "t", "llama", dict(bos_token_id=1, eos_token_id=2), ["<unk>", "<s>", "</s>"],
                             "<s>", {"bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast"})
    tj = json.loads((d / "tokenizer.json").read_text())
    tj["post_processor"]["single"].append({"SpecialToken": {"id": "</s>", "type_id": 0}})
    tj["post_processor"]["special_tokens"]["</s>"] = {"id": "</s>", "ids": [2], "tokens": ["</s>"]}
    (d / "tokenizer.json").write_text(json.dumps(tj))
    ours, theirs = M.Tokenizer(d, M.read_config(d)), T.AutoTokenizer.from_pretrained(d)
    assert ours.lead == [1]
    for text in (SENTENCES[0], ""):
        assert theirs(text)["input_ids"][-1] == 2
        assert ours.encode(text) == theirs(text)["input_ids"][:-1]


def test_without_a_bos_in_tokenizer_config_json_config_json_names_it_or_there_is_none(tmp_path):
    """tokenizer_config.json silent on bos_token: config.json's bos_token_id, added only where asked
    (the template puts none first, and the file is silent on add_bos_token: transformers adds
    none); neither names one: no BOS, even where one is asked for."""
    d = tokenizer_checkpoint(tmp_path / "t", "llama", dict(eos_token_id=2), ["<unk>", "<s>", "</s>"], None,
                             {"eos_token": "</s>"})
    tok = M.Tokenizer(d, M.read_config(d))
    assert tok.bos_id is None and tok.encode("", bos=True) == [] and tok.encode(SENTENCES[0], bos=True)[0] is not None
    (d / "config.json").write_text(json.dumps(json.loads((d / "config.json").read_text()) | dict(bos_token_id=1)))
    tok = M.Tokenizer(d, M.read_config(d))
    assert tok.bos_id == 1 and tok.encode("") == [] and tok.encode("", bos=True) == [1]


@pytest.mark.parametrize("add_bos_token, template", [(True, None), (False, "<s>")])
def test_the_template_decides_the_bos_where_add_bos_token_disagrees_as_transformers_5(tmp_path, add_bos_token,
                                                                                        template):
    """An early Phi-3-mini-128k's files: add_bos_token true, no BOS in tokenizer.json's template
    (transformers 4's LlamaTokenizerFast rebuilt the template from add_bos_token and added one);
    and the reverse. transformers 5 reads the template alone (add_bos_token only without a
    tokenizer.json), and so does the tokenizer here."""
    import transformers as T
    d = tokenizer_checkpoint(tmp_path / "t", "phi3", dict(bos_token_id=1, eos_token_id=2), ["<unk>", "<s>", "</s>"],
                             template, {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": add_bos_token,
                                        "tokenizer_class": "LlamaTokenizer"})
    ours, theirs = M.Tokenizer(d, M.read_config(d)), T.AutoTokenizer.from_pretrained(d)
    for text in (SENTENCES[0], ""):
        assert ours.encode(text) == theirs(text)["input_ids"]
    assert ours.lead == ([] if template is None else [1])


@pytest.mark.parametrize("listed", [False, True])
def test_generation_stops_at_generation_config_json_end_tokens_as_transformers_does(tmp_path, listed):
    """generation_config.json's eos_token_id (an id or a list: a chat model's end of turn, as
    Llama-3-Instruct's [128001, 128009]) ends generation, with config.json's."""
    d = tmp_path / "s"
    shutil.copytree(STORIES, d)
    prompt = M.load(d).tokenizer.encode("Once upon a time")
    stop = M.generate(M.load(d), [prompt], 10)[0][3]     # a token greedy decoding reaches: the end of turn
    end = [2, stop] if listed else stop
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": end}))
    m = M.load(d)
    assert m.tokenizer.eos_ids == [2, stop]
    ours = M.generate(m, [prompt], 10)[0]
    with torch.no_grad():
        theirs = hf_load(d).generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)[0, len(prompt):]
    assert ours == theirs.tolist() and len(ours) == 4 and ours[-1] == stop


def test_a_sequence_of_a_batch_ends_at_its_end_token_while_the_others_go_on(tmp_path):
    """Greedy decoding of a batch gives each prompt what it gives alone: one that reaches an end
    token gets nothing past it while the batch goes on for the others."""
    d = tmp_path / "s"
    shutil.copytree(STORIES, d)
    m = M.load(d)
    prompts = [m.tokenizer.encode("Once upon a time"), m.tokenizer.encode("Lily and Tom")]
    stop = M.generate(m, prompts[:1], 10)[0][3]
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": stop}))
    m = M.load(d)
    alone = [M.generate(m, [p], 10)[0] for p in prompts]
    assert len(alone[0]) == 4 and alone[0][-1] == stop and len(alone[1]) > 5
    assert M.generate(m, prompts, 10) == alone


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


def test_model_cli_from_no_prompt_without_a_bos_token_says_so(ckpt, tmp_path):
    """No prompt and no BOS to start from (neither tokenizer_config.json nor config.json names
    one, and tokenizer.json's template puts none first): a one-line error, not a TypeError from
    a None token."""
    d = tmp_path / "nobos"
    shutil.copytree(ckpt("qwen2"), d)
    c = json.loads((d / "config.json").read_text())
    del c["bos_token_id"]
    (d / "config.json").write_text(json.dumps(c))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    (d / "tokenizer.json").write_text(json.dumps(json.loads((d / "tokenizer.json").read_text()) | {"post_processor": None}))
    with pytest.raises(SystemExit, match="the prompt '' encodes to no tokens and the tokenizer of .* has no BOS token"):
        M.main([str(d), "--max-new-tokens", "2", "--device", "cpu"])


@pytest.mark.parametrize("flags,message", [(["--top-k", "0"], "--max-new-tokens must be at least 0 and --top-k at least 1"),
                                           (["--max-new-tokens", "-1"], "--max-new-tokens must be at least 0"),
                                           (["--seed", str(10 ** 20)], "--seed 100000000000000000000: give a whole number")])
def test_model_cli_refuses_bad_generation_flags(capsys, flags, message):
    with pytest.raises(SystemExit):
        M.main([str(STORIES), "--prompt", "Lily", "--device", "cpu", *flags])
    assert message in capsys.readouterr().err


def test_model_cli_says_when_the_key_value_cache_does_not_fit(capsys, monkeypatch):
    """--max-new-tokens 1000000000: the cache is made whole first (128 GB here): one line, not
    the allocator's traceback (where it fails below the memory cache_too_large counts: a GPU's
    other tenants, a ulimit)."""
    monkeypatch.setattr(M, "cache_too_large", lambda *a: None)

    def too_big(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 128000000384 bytes")
    monkeypatch.setattr(M, "KVCache", too_big)
    with pytest.raises(SystemExit, match=r"error: out of memory generating 1000000000 tokens \(the key-value cache is "
                                         r"made for all \d+ first\): .*DefaultCPUAllocator: can't allocate"):
        M.main([str(STORIES), "--prompt", "Lily", "--device", "cpu", "--max-new-tokens", "1000000000"])


def test_top_k_sampling_takes_each_token_among_the_k_likeliest(tmp_path):
    """Each sampled token is one of the top_k most likely next tokens (by the logits of the whole
    sequence, recomputed without a cache), and the samples are not all the greedy ones."""
    m = M.load(make_hf_checkpoint(tmp_path / "m", "llama-gqa-rope3"))
    prompts = [[1, 5, 9, 33], [1, 44], [1, 7, 8, 9, 10, 11]]
    got = M.generate(m, prompts, 10, top_k=3, seed=5, stop_at_eos=False)
    greedy = 0
    for p, g in zip(prompts, got):
        assert len(g) == 10
        for n in range(len(g)):
            logits = m(torch.tensor([p + g[:n]])).logits[0, -1]
            assert g[n] in logits.topk(3).indices.tolist()
            greedy += g[n] == int(logits.argmax())
    assert greedy < 30


def test_top_k_past_the_vocabulary_samples_from_all_of_it():
    m = M.load(STORIES)
    ids = [m.tokenizer.encode("Lily")]
    assert M.generate(m, ids, 5, top_k=10 ** 6, seed=1) == M.generate(m, ids, 5, top_k=m.cfg.vocab_size, seed=1)


def test_tokenizer_does_not_truncate_as_transformers_does_not(ckpt):
    """The bundled GPT-2 tokenizer.json carries truncation at 50 tokens; encoding ignores it."""
    import transformers as T
    m = M.load(ckpt("gpt2"))
    text = " ".join(["Lily went to the store and bought a red apple."] * 20)
    ids = m.tokenizer.encode(text)
    assert len(ids) > 200 and m.tokenizer.decode(ids) == text
    assert ids == T.AutoTokenizer.from_pretrained(ckpt("gpt2"))(text)["input_ids"]


@pytest.mark.parametrize("kind", ["gpt2", "qwen2", "qwen3-gqa-bias", "mistral-gqa-window", "gemma2-gqa-window-caps",
                                  "gemma3", "gpt-neox-sequential", "phi3", "phi", "smollm3", "olmo3", "glm", "granite",
                                  "mistral3-small"])
def test_model_cli_continues_a_prompt_with_a_tiny_random_checkpoint_of_each_family(ckpt, kind, capsys):
    M.main([str(ckpt(kind)), "--prompt", "Once upon a time", "--max-new-tokens", "6", "--device", "cpu"])
    printed = capsys.readouterr().out
    m = M.load(ckpt(kind))
    ids = m.tokenizer.encode("Once upon a time")
    assert printed == m.tokenizer.decode(ids + M.generate(m, [ids], 6)[0]) + "\n"
    assert printed.startswith("Once upon a time") and len(printed) > len("Once upon a time\n")
