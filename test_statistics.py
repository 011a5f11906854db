"""Tests of stats.py: the statistics file (round trip, refusals naming what differs), the
MEMIT/ROME-family .npz files, and the collection sharded over torch.distributed ranks.
Run: python -m pytest -q test_statistics.py"""
import io
import json
from types import SimpleNamespace
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import data
import model as M
import stats as S
from test_lyaplock import DEVICES

HERE = Path(__file__).parent
FIX = HERE / "fixtures"
STORIES = FIX / "stories260K-hf"
CORPUS = FIX / "wikitext-2-test-sample.txt"


@pytest.fixture(scope="module")
def stories():
    return M.load(STORIES)


@pytest.fixture(scope="module")
def made(tmp_path_factory, stories):
    """A statistics file for layers 1, 2 of stories260K (3,000 tokens), written by the command."""
    out = tmp_path_factory.mktemp("stats") / "stories.safetensors"
    assert S.main(["--model", str(STORIES), "--layers", "1,2", "--stats-tokens", "3000",
                   "--batch-tokens", "1000", "--out", str(out)]) == 0
    return out


def quiet(*a, **k):
    pass


# ----------------------------------------------------------------------------- the file

def test_the_file_holds_collect_stats_C_bitwise_and_its_key(made, stories):
    seqs = S.stats_sequences(stories.tokenizer, data.read_corpus(CORPUS), 3000)
    C = S.collect_stats(stories, seqs, [1, 2], batch_tokens=1000)
    stored = load_file(str(made))
    assert set(stored) == {"C.1", "C.2"} and all(torch.equal(stored[f"C.{l}"], C[l]) for l in (1, 2))
    logs = []
    back = S.load_stats_file(made, stories, STORIES, (2,), log=logs.append)
    assert set(back) == {2} and torch.equal(back[2], C[2])
    assert logs == [f"statistics: {made} (3000 tokens, layers 2)"]
    with safe_open(str(made), "pt") as f:
        meta = f.metadata()
    key = json.loads(meta["key"])
    assert (meta["format"], meta["version"], meta["tokens"]) == ("lyaplock-statistics", "3", "3000")
    assert key == S.stats_key(STORIES, stories, [1, 2], CORPUS, 3000, 256)
    assert key["tokenizer"] == S.tokenizer_sha(STORIES)
    assert (key["layers"], key["d_mlp"], key["dtype"], key["max_len"]) == ([1, 2], 172, "float32", 256)
    assert key["corpus"] == data.file_sha256(CORPUS)
    assert set(key["tensors"]) == set(stories.names_through_layer(2))    # tied head: not a separate file tensor


def test_the_command_shows_progress_and_a_final_line(tmp_path, capsys):
    out = tmp_path / "s.safetensors"
    assert S.main(["--model", str(STORIES), "--stats-tokens", "2000", "--out", str(out)]) == 0
    io = capsys.readouterr()
    assert io.out.startswith("statistics: 2,000 tokens in ") and " tok/s, layers 1,2; wrote " in io.out
    assert "statistics: 2,000/2,000 tokens, " in io.err and " left" in io.err     # the preset's layers
    assert not list(tmp_path.glob("*.tmp"))
    assert "warning" not in io.err
    assert S.main(["--model", str(STORIES), "--stats-tokens", "100", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert ": 100 tokens taken (--stats-tokens 100); C (172×172) needs at least d_mlp = 172 tokens" in err


def test_time_left_counts_hours_past_a_day(monkeypatch):
    """70M tokens at 70 tok/s leave 277.75 h; it used to print 13:45:00 (a day's wrap)."""
    now = [0.0]
    monkeypatch.setattr(S.time, "time", lambda: now[0])
    lines = []
    progress = S.Progress(70_000_000, lambda s, end="\n": lines.append(s), tty=False)
    for now[0], done in ((100.0, 7_000), (200.0, 2_800_000)):
        progress(done)
    assert lines == ["statistics: 7,000/70,000,000 tokens, 70 tok/s, 277:45:00 left",
                     "statistics: 2,800,000/70,000,000 tokens, 14,000 tok/s, 01:20:00 left"]


def test_an_editing_run_s_collection_writes_lines_where_stdout_is_no_terminal(stories, tmp_path, monkeypatch):
    """load_or_collect_stats (editing runs) logs to stdout: redirected to a file (here pytest's
    capture) it gets whole lines, no carriage-return refreshes and no empty line at the end; a
    terminal gets the refreshes."""
    calls = []
    S.load_or_collect_stats(stories, STORIES, CORPUS, 1000, (1,), tmp_path, batch_tokens=300,
                            log=lambda s, end="\n": calls.append((s, end)))
    assert calls[-1][0].startswith("statistics: 1,000/1,000 tokens, ")
    assert all(end == "\n" and s and "\r" not in s for s, end in calls)

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    monkeypatch.setattr(sys, "stdout", Terminal())
    assert S.Progress(1000, quiet).tty


def test_a_spread_model_s_progress_says_one_pass_a_device(tmp_path, capsys):
    """--device cpu,cpu puts layers 1 and 4 on two devices: two passes, one a device (not a layer)."""
    assert S.main(["--model", str(STORIES), "--device", "cpu,cpu", "--layers", "1,4", "--stats-tokens", "1000",
                   "--out", str(tmp_path / "C.safetensors")]) == 0
    assert "statistics: 2,000/2,000 tokens over 2 passes, one a device, " in capsys.readouterr().err


@pytest.mark.parametrize("device", DEVICES)
def test_with_the_state_on_the_host_one_layer_a_pass_gives_the_same_C_there(device, tmp_path):
    """--state-device cpu: one pass per edit layer, so the device holds one layer's float64 sum at
    a time, each C moved to the host as its pass ends: the same C to the bit as the one pass for
    all layers (each layer's sum adds the same batches in the same order), on the host; and a
    statistics file or the cache read with the state on the host puts C there directly. On
    CUDA the device's peak holds one layer's sum, not two."""
    model = M.load(STORIES, device)
    seqs = S.stats_sequences(model.tokenizer, data.read_corpus(CORPUS), 3000)
    assert S.collection_passes(model, (1, 2)) == [(1, 2)]
    assert S.collection_passes(model, (2, 1), "cpu") == [(1,), (2,)]
    seen = []
    peaks = {}
    results = {}
    for state_device in (None, "cpu"):
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
        results[state_device] = S.collect_stats(model, seqs, [1, 2], batch_tokens=1000, state_device=state_device,
                                                progress=seen.append if state_device else None)
        if device == "cuda":
            peaks[state_device] = torch.cuda.max_memory_allocated() - start
    one, host = results[None], results["cpu"]
    if device == "cuda":                 # at least one layer's float64 sum less at the peak
        assert peaks[None] - peaks["cpu"] >= 8 * 172 ** 2, peaks
    assert {l: c.device.type for l, c in host.items()} == {1: "cpu", 2: "cpu"}
    assert {l: c.device.type for l, c in one.items()} == {1: device, 2: device}
    assert all(torch.equal(host[l], one[l].cpu()) for l in (1, 2))
    assert seen[-1] == 2 * 3000 and seen == sorted(seen)                 # two passes of 3,000 tokens
    file = tmp_path / "C.safetensors"
    S.write_stats_file(file, one, S.stats_key(STORIES, model, [1, 2], CORPUS, 3000, 256), 3000)
    for state_device, kind in ((None, device), ("cpu", "cpu")):
        back = S.load_stats_file(file, model, STORIES, (1, 2), log=quiet, state_device=state_device)
        assert {c.device.type for c in back.values()} == {kind}
        cached = S.load_or_collect_stats(model, STORIES, CORPUS, 3000, (1, 2), tmp_path / "cache", log=quiet,
                                         batch_tokens=1000, state_device=state_device)
        assert {c.device.type for c in cached.values()} == {kind}
        assert all(torch.equal(cached[l].cpu(), one[l].cpu()) for l in (1, 2))


def test_with_the_state_on_the_host_a_pass_frees_its_sum_before_the_next_allocates(stories, monkeypatch):
    """One layer a pass, C copied to the state device: no earlier pass's float64 buffer is alive
    when the next pass allocates its own, so a GPU holds one layer's sum at a time. (On CUDA the
    copy to the host leaves the buffer to the pass alone; here a state device of "meta", whose
    copy holds no storage, stands for it.)"""
    import gc
    import weakref
    seqs = S.stats_sequences(stories.tokenizer, data.read_corpus(CORPUS), 600)
    real, buffers, alive = S.gram_sums, [], []

    def spy(*a, **k):
        gc.collect()
        alive.append(sum(b() is not None for b in buffers))
        flat = real(*a, **k)
        buffers.append(weakref.ref(flat))
        return flat
    monkeypatch.setattr(S, "gram_sums", spy)
    C = S.collect_stats(stories, seqs, [1, 2, 3], batch_tokens=500, state_device="meta")
    assert {c.device.type for c in C.values()} == {"meta"} and len(buffers) == 3
    assert alive == [0, 0, 0]


@pytest.mark.parametrize("seed", range(4))
def test_mirroring_a_block_of_rows_at_a_time_is_the_whole_matrix_s_bitwise(seed):
    """mirror_lower (finish_sums, no m × m temporary) against the one-shot tril + tril(-1)ᵀ on
    random sizes and blocks, upper triangles holding other values (add_gram_lower's diagonal
    blocks): the same bits."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(5):
        m, block = (int(x) for x in torch.randint(1, 60, (2,), generator=g))
        X = torch.randn(m, m, generator=g, dtype=torch.float64)
        whole = X.tril() + X.tril(-1).T
        S.mirror_lower(X, block)
        assert torch.equal(X.view(torch.int64), whole.view(torch.int64)), (m, block)


def test_on_a_spread_model_each_device_collects_its_layers_C_beside_them():
    """Layers across devices (cpu,cpu here; cpu,cuda in the CUDA tests of test_multidevice): one
    pass for the edit layers of each device, their sums on that device; the same C to the bit."""
    spread = M.load(STORIES, "cpu,cpu")
    assert spread.stages[1] != spread.stages[4]
    seqs = S.stats_sequences(spread.tokenizer, data.read_corpus(CORPUS), 2000)
    assert S.collection_passes(spread, (1, 4)) == [(1,), (4,)]
    whole = S.collect_stats(M.load(STORIES), seqs, [1, 4], batch_tokens=700)
    C = S.collect_stats(spread, seqs, [1, 4], batch_tokens=700)
    assert all(torch.equal(C[l], whole[l]) for l in (1, 4))


def test_the_command_with_the_state_on_the_host_says_its_passes_and_writes_the_same_file(made, tmp_path, capsys):
    out = tmp_path / "host.safetensors"
    assert S.main(["--model", str(STORIES), "--layers", "1,2", "--stats-tokens", "3000", "--batch-tokens", "1000",
                   "--state-device", "cpu", "--out", str(out)]) == 0
    io = capsys.readouterr()
    assert "statistics: 6,000/6,000 tokens over 2 passes, one a layer, " in io.err
    assert io.out.startswith("statistics: 3,000 tokens in ")
    a, b = load_file(str(made)), load_file(str(out))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    with safe_open(str(made), "pt") as f, safe_open(str(out), "pt") as g:
        assert f.metadata() == g.metadata()
    assert S.main(["--model", str(STORIES), "--state-device", "tpu", "--out", str(out)]) == 1
    assert "tpu" in capsys.readouterr().err


def copy_with(tmp_path, name: str, change=None) -> Path:
    """A copy of stories260K whose tensor `name` is changed (config.json as it was)."""
    path = tmp_path / name.replace(".", "_")
    shutil.copytree(STORIES, path)
    tensors = load_file(str(path / "model.safetensors"))
    tensors[name] = tensors[name] + 1e-3 if change is None else change(tensors[name])
    save_file(tensors, str(path / "model.safetensors"))
    return path


def test_a_file_for_other_weights_is_refused_above_the_last_layer_ignored(made, stories, tmp_path):
    below = copy_with(tmp_path, "model.layers.1.self_attn.q_proj.weight")
    with pytest.raises(S.StatisticsError, match=r"made for other weights: through layer 2, tensor "
                                                r"model\.layers\.1\.self_attn\.q_proj\.weight differs"):
        S.load_stats_file(made, M.load(below), below, (1, 2), log=quiet)
    embed = copy_with(tmp_path, "model.embed_tokens.weight")
    with pytest.raises(S.StatisticsError, match="tensor model.embed_tokens.weight differs"):
        S.load_stats_file(made, M.load(embed), embed, (1, 2), log=quiet)
    above = copy_with(tmp_path, "model.layers.3.mlp.down_proj.weight")
    assert S.stats_key(above, stories, [1, 2], CORPUS, 3000, 256) == S.stats_key(STORIES, stories, [1, 2], CORPUS, 3000, 256)
    assert S.stats_key(below, stories, [1, 2], CORPUS, 3000, 256)["weights"] != \
        S.stats_key(STORIES, stories, [1, 2], CORPUS, 3000, 256)["weights"]
    assert set(S.load_stats_file(made, M.load(above), above, (1, 2), log=quiet)) == {1, 2}
    config = tmp_path / "config"
    shutil.copytree(STORIES, config)
    (config / "config.json").write_text((STORIES / "config.json").read_text().replace("1e-05", "1e-06"))
    with pytest.raises(S.StatisticsError, match="config.json differs"):
        S.load_stats_file(made, M.load(config), config, (1, 2), log=quiet)


def test_a_tensor_s_digest_covers_all_its_bytes_its_dtype_and_its_shape(tmp_path):
    """tensor_digests reads a tensor in 16 MiB blocks: a change in the last element of one past
    its first block (the fixtures' tensors are all smaller) changes its digest, and so do the same
    bytes stored as another shape or another dtype; the same tensor written again does not."""
    def digest(name, w):
        (tmp_path / name).mkdir()
        save_file({"w": w}, str(tmp_path / name / "model.safetensors"))
        return S.tensor_digests(tmp_path / name, ["w"])["w"]
    big = torch.zeros(2 ** 22 + 8)                        # 16 MiB and 32 bytes of float32
    changed = big.clone()
    changed[-1] = 1.0
    same = digest("same", big.clone())
    assert digest("big", big) == same
    assert same not in (digest("changed", changed), digest("shape", big.view(8, -1)),
                        digest("dtype", big.view(torch.int32)))


def test_a_file_or_cache_made_with_another_tokenizer_is_refused_or_recomputed(made, stories, tmp_path):
    """The token ids come from tokenizer.json and tokenizer_config.json (the BOS: the template's):
    with no BOS in the template, C differs, so the file is refused and the cache not reused. An
    absent tokenizer_config.json counts as empty, a key of its own."""
    nobos = tmp_path / "nobos"
    shutil.copytree(STORIES, nobos)
    tokenizer = nobos / "tokenizer.json"
    tokenizer.write_text(json.dumps(json.loads(tokenizer.read_text()) | {"post_processor": None}))
    config = nobos / "tokenizer_config.json"
    model = M.load(nobos)
    assert model.tokenizer.lead == [] and stories.tokenizer.lead == [1]
    with pytest.raises(S.StatisticsError, match=r"made with another tokenizer: .*nobos's tokenizer\.json or "
                                                r"tokenizer_config\.json differs"):
        S.load_stats_file(made, model, nobos, (1, 2), log=quiet)
    S.load_or_collect_stats(stories, STORIES, CORPUS, 1000, (1,), tmp_path / "cache", log=quiet)
    logs = []
    C = S.load_or_collect_stats(model, nobos, CORPUS, 1000, (1,), tmp_path / "cache", log=lambda s, **k: logs.append(s))
    assert not any("reusing" in line for line in logs)
    seqs = S.stats_sequences(model.tokenizer, data.read_corpus(CORPUS), 1000)
    assert torch.equal(C[1], S.collect_stats(model, seqs, [1])[1])
    turned_off = S.tokenizer_sha(nobos)
    config.unlink()
    assert S.tokenizer_sha(nobos) not in (turned_off, S.tokenizer_sha(STORIES))


def test_other_layers_or_another_shape_are_refused(made, stories):
    with pytest.raises(S.StatisticsError, match=r"made for layers \[1, 2\]; this run edits \[1, 3\] "
                                                r"\(no C for layer 3\)"):
        S.load_stats_file(made, stories, STORIES, (1, 3), log=quiet)
    other = FIX / "factmodel-ci"
    with pytest.raises(S.StatisticsError, match=r"made for d_mlp = 172 \(C 172×172\); this model's d_mlp is 384"):
        S.load_stats_file(made, M.load(other), other, (1, 2), log=quiet)


def file_key(path) -> dict:
    """The key a statistics file holds."""
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["key"])


def rewritten(made, tmp_path, tensors=None, **meta_changes) -> Path:
    """The statistics file written again with other tensors and/or metadata."""
    with safe_open(str(made), "pt") as f:
        meta = f.metadata() | meta_changes
        old = {k: f.get_tensor(k) for k in f.keys()}
    out = tmp_path / "changed.safetensors"
    save_file(old if tensors is None else tensors, str(out), metadata=meta)
    return out


def test_a_corrupt_truncated_or_unsound_file_is_an_error_never_used(made, stories, tmp_path):
    def refused(path, pattern):
        with pytest.raises(S.StatisticsError, match=pattern):
            S.load_stats_file(path, stories, STORIES, (1, 2), log=quiet)
    raw = made.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(raw[:len(raw) // 2])
    refused(cut, "not a readable statistics file \\(truncated or corrupt\\?\\)")
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(raw[:-8] + bytes(8))                  # the last element, C.2[-1, -1], zeroed
    refused(flipped, "C.2 is corrupt")
    for old in ("1", "2"):        # 2: made when tokenizer_config.json's add_bos_token could decide the BOS
        refused(rewritten(made, tmp_path, version=old), f"statistics format version {old}; this code reads version 3")
    refused(rewritten(made, tmp_path, format="something"), "not a statistics file")
    with safe_open(str(made), "pt") as f:
        meta = f.metadata()
    key = json.loads(meta["key"])
    for change, what in ((dict(key=json.dumps(key | {"d_mlp": "172"})), r"key is damaged \(d_mlp of the wrong kind"),
                         (dict(key=json.dumps(key | {"layers": [1, "2"]})), "layers of the wrong kind"),
                         (dict(key=json.dumps([1])), "key is damaged .it lacks"),   # was an AttributeError
                         (dict(sha256=json.dumps(["a"])), r"metadata is damaged \(its sha256 or tokens"),
                         (dict(tokens="many"), r"metadata is damaged \(its sha256 or tokens")):
        refused(rewritten(made, tmp_path, **change), what)
    without = {k: v for k, v in meta.items() if k != "tokens"}                    # was a KeyError
    save_file(load_file(str(made)), str(tmp_path / "untold.safetensors"), metadata=without)
    refused(tmp_path / "untold.safetensors", r"metadata is damaged \(its sha256 or tokens")
    C = load_file(str(made))
    refused(rewritten(made, tmp_path, {"C.1": C["C.1"]}), "tensor C.2 is missing")
    refused(rewritten(made, tmp_path, {"C.1": C["C.1"].float(), "C.2": C["C.2"]}),
            r"C.1 is float32 \(172, 172\); float64 \(172, 172\) is needed")
    for bad in (C["C.1"].clone().fill_diagonal_(float("nan")), C["C.1"] + torch.eye(172, dtype=torch.float64).roll(1, 0),
                C["C.1"].clone().fill_diagonal_(float("inf"))):     # symmetric (inf == inf): the finiteness check's
        path = tmp_path / "unsound.safetensors"
        S.write_stats_file(path, {1: bad, 2: C["C.2"]}, file_key(made), 3000)
        refused(path, "C.1 is not a finite symmetric matrix")


def test_a_file_whose_digests_leave_a_tensor_out_is_refused(made, stories, tmp_path):
    """Every C is checked against the sha256 written for it: a file whose digests lack one (C.1
    here, its bytes changed) is corrupt, not a C that escapes the check."""
    with safe_open(str(made), "pt") as f:
        digests = json.loads(f.metadata()["sha256"])
    C = load_file(str(made))
    other = {"C.1": C["C.1"] * 2, "C.2": C["C.2"]}
    for path in (rewritten(made, tmp_path, sha256=json.dumps({"C.2": digests["C.2"]})),
                 rewritten(made, tmp_path, other, sha256=json.dumps({"C.2": digests["C.2"]}))):
        with pytest.raises(S.StatisticsError, match="C.1 is corrupt"):
            S.load_stats_file(path, stories, STORIES, (1, 2), log=quiet)


def test_a_file_of_a_later_format_version_is_refused(made, stories, tmp_path):
    """Only this code's version is read: a file of a later version is refused as an earlier one is,
    not taken because its number is higher."""
    with pytest.raises(S.StatisticsError, match="statistics format version 4; this code reads version 3"):
        S.load_stats_file(rewritten(made, tmp_path, version="4"), stories, STORIES, (1, 2), log=quiet)


def test_a_key_that_lacks_any_one_field_is_refused_naming_it(made, stories, tmp_path):
    """The key written holds every field read_meta requires, and a key without any one of them (the
    tensors' digests a refusal names, say) is damaged: refused naming the field, never read as far
    as it goes or a KeyError."""
    key = file_key(made)
    assert set(key) == S.KEY_FIELDS
    for field in sorted(key):
        less = json.dumps({k: v for k, v in key.items() if k != field})
        with pytest.raises(S.StatisticsError, match=rf"key is damaged \(it lacks {field}\)"):
            S.load_stats_file(rewritten(made, tmp_path, key=less), stories, STORIES, (1, 2), log=quiet)


def test_a_cache_file_of_another_key_under_this_key_s_name_is_recomputed(stories, tmp_path):
    """The cache reuses a file only when the key inside is the one asked for, not only its
    weights' (a file copied under another key's name: here 1,000 tokens' C where 1,200 are asked)."""
    S.load_or_collect_stats(stories, STORIES, CORPUS, 1000, (1,), tmp_path / "a", log=quiet)
    C = S.load_or_collect_stats(stories, STORIES, CORPUS, 1200, (1,), tmp_path / "b", log=quiet)
    [a], [b] = (tmp_path / "a").glob("stats-*"), (tmp_path / "b").glob("stats-*")
    shutil.copy(a, b)
    logs = []
    again = S.load_or_collect_stats(stories, STORIES, CORPUS, 1200, (1,), tmp_path / "b",
                                    log=lambda s, **k: logs.append(s))
    assert not any("reusing" in line for line in logs) and any("another key" in line for line in logs)
    assert torch.equal(again[1], C[1])


def test_the_cache_keeps_one_file_per_key(stories, tmp_path):
    """Each key has a file of its own (named by the whole key, not only the weights'): collecting
    for another token count leaves the first key's file, which is then reused, not recomputed."""
    S.load_or_collect_stats(stories, STORIES, CORPUS, 400, (1,), tmp_path, log=quiet)
    S.load_or_collect_stats(stories, STORIES, CORPUS, 500, (1,), tmp_path, log=quiet)
    assert len(list(tmp_path.glob("stats-*.safetensors"))) == 2
    logs = []
    S.load_or_collect_stats(stories, STORIES, CORPUS, 400, (1,), tmp_path, log=lambda s, **k: logs.append(s))
    assert any(line.startswith("statistics: reusing ") for line in logs)


def test_a_second_writer_of_the_same_file_neither_truncates_nor_removes_this_ones(tmp_path, monkeypatch):
    """Runs that share a statistics cache may collect the same statistics at once. Another
    process's write, begun while this one's is finishing (here: called from inside this one's
    rename, under another pid), goes to a temporary file of its own: both renames succeed and
    the file is whole (with one temporary name for all, the second writer truncated the first's
    file and took it away before its rename: FileNotFoundError)."""
    path, key = tmp_path / "s.safetensors", dict(layers=[1])
    C = {1: torch.eye(3, dtype=torch.float64)}
    real_replace, others = os.replace, []

    def replace(src, dst):
        if not others:
            others.append(src)
            monkeypatch.setattr(os, "getpid", lambda: 12345)
            S.write_stats_file(path, {1: 2 * C[1]}, key, 7)
        real_replace(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    S.write_stats_file(path, C, key, 5)
    assert torch.equal(load_file(str(path))["C.1"], C[1]) and not list(tmp_path.glob("*.tmp"))
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OSError, match="No space left"):          # a failed write leaves no temporary file
        S.write_stats_file(tmp_path / "t.safetensors", C, key, 5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.safetensors"]


def test_a_file_of_another_dtype_is_used_with_a_warning(tmp_path, stories):
    out = tmp_path / "bf16.safetensors"
    assert S.main(["--model", str(STORIES), "--layers", "1,2", "--stats-tokens", "1000", "--dtype", "bfloat16",
                   "--out", str(out)]) == 0
    logs = []
    C = S.load_stats_file(out, stories, STORIES, (1, 2), log=logs.append)
    assert C[1].dtype == torch.float64 and "was collected with a bfloat16 forward pass, this run is float32" in logs[0]


# ----------------------------------------------------------------------------- the MEMIT/ROME files

def their_file(folder: Path, layer: int, kind: str = "mom2", S_=None, count=1234, n=100000, m=172, seed=0) -> Path:
    """A file as their rome/layer_stats.py writes it (util/runningstats.py's SecondMoment)."""
    g = torch.Generator().manual_seed(seed + layer)
    k = torch.randn(50, m, generator=g, dtype=torch.float64)
    mom2 = (k.T @ k).numpy() if S_ is None else S_
    folder.mkdir(parents=True, exist_ok=True)
    tail = "mom2" if kind == "mom2" else "KK_T"
    file = folder / f"model.layers.{layer}.mlp.down_proj_float64_{tail}_{n}{'_kk_t' * (kind == 'KK_T')}.npz"
    np.savez(file, **{f"{kind}.constructor": np.array("util.runningstats.SecondMoment()"),
                      f"{kind}.count": np.array(count), f"{kind}.mom2": mom2, "sample_size": np.array(n)})
    return file


def test_their_mom2_files_give_C_as_sum_over_count(tmp_path, stories):
    """Their moment() is mom2.mom2 / mom2.count; ours the same in float64, their sum first made
    exactly symmetric: a product kᵀk (their layer 2 here) need not be bitwise symmetric."""
    folder = tmp_path / "data" / "stats" / "stories260K" / "wikipedia_stats"
    k = torch.randn(50, 172, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mirrored = (k.T @ k).tril() + (k.T @ k).tril(-1).T
    files = {1: their_file(folder, 1, S_=mirrored.numpy()), 2: their_file(folder, 2)}
    their_file(folder, 2, "KK_T", count=700)                    # LyapLock's kk_t beside it: mom2 is taken
    for where in (folder, folder.parent):                      # <model>/wikipedia_stats or <model>
        logs = []
        C = S.load_stats_file(where, stories, STORIES, (1, 2), log=logs.append)
        for l, f in files.items():
            with np.load(f, allow_pickle=False) as z:
                total = torch.from_numpy(z["mom2.mom2"])
            moment = total / 1234                                                 # their moment()
            assert C[l].dtype == torch.float64 and torch.equal(C[l], (total + total.T) / 2 / 1234)
            assert float((C[l] - moment).abs().max()) <= 1e-15 * float(moment.abs().max())
        assert torch.equal(C[1], mirrored / 1234)                                 # exactly their moment()
        assert "carry no fingerprint of the weights" in logs[-1]
        assert logs[1] == f"statistics: layer 2 from {files[2]} (C = mom2.mom2 / mom2.count)"
    one = S.load_stats_file(files[2], stories, STORIES, (2,), log=quiet)      # one file, one layer
    assert torch.equal(one[2], C[2])
    kk = tmp_path / "kk"                                                       # only LyapLock's KK_T
    their_file(kk, 1, "KK_T", S_=mirrored.numpy(), count=700)
    assert torch.equal(S.load_stats_file(kk, stories, STORIES, (1,), log=quiet)[1], mirrored / 700)


@pytest.mark.parametrize("family, theirs", [     # their hparams' rewrite_module_tmp
    ("llama", "model.layers.{}.mlp.down_proj"), ("qwen2", "model.layers.{}.mlp.down_proj"),
    ("gptj", "transformer.h.{}.mlp.fc_out"), ("gpt2", "transformer.h.{}.mlp.c_proj"),
    ("gpt_neox", "gpt_neox.layers.{}.mlp.dense_4h_to_h"), ("phi", "model.layers.{}.mlp.fc2"),
    ("glm4", "model.layers.{}.mlp.down_proj"), ("granite", "model.layers.{}.mlp.down_proj"),
    ("ministral3", "model.layers.{}.mlp.down_proj")])
def test_their_files_are_found_by_their_module_names(family, theirs):
    shape = dict(n_embd=64, n_layer=6, n_head=4, vocab_size=100, rotary_dim=8) if family == "gptj" else dict(
        n_embd=64, n_layer=6, n_head=4, vocab_size=100) if family == "gpt2" else dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=4,
        vocab_size=100)
    cfg = M.Config.from_hf(dict(model_type=family, **shape))
    with torch.device("meta"):
        m = M.CausalLM(cfg)
    assert S.authors_module(cfg, 5) == theirs.format(5)
    assert m.get_parameter(theirs.format(5) + ".weight") is m._edit_parameter(5)      # the edited projection


def test_their_files_that_do_not_fit_are_refused(tmp_path, stories):
    def refused(path, layers, pattern):
        with pytest.raises(S.StatisticsError, match=pattern):
            S.load_stats_file(path, stories, STORIES, layers, log=quiet)
    f1 = their_file(tmp_path / "a", 1)
    refused(tmp_path / "a", (1, 2), "no statistics for layer 2")
    refused(f1, (1, 2), "one .npz file is one layer's statistics")
    refused(f1, (2,), "not named for layer 2")
    their_file(tmp_path / "a", 1, n=1000)
    refused(tmp_path / "a", (1,), r"layer 1 has 2 mom2 files \(.*_1000.npz, .*_100000.npz\); keep one")
    refused(their_file(tmp_path / "b", 1, m=64), (1,), r"mom2.mom2 is float64 \(64, 64\); a float \(172, 172\)")
    refused(their_file(tmp_path / "c", 1, count=0), (1,), "mom2.count is .*not a token count")
    refused(their_file(tmp_path / "c2", 1, count=171), (1,), "mom2.count is 171 tokens, fewer than d_mlp = 172: "
                                                             "C would be singular")
    their_file(tmp_path / "stats_dir" / "stories" / "wikipedia_stats", 1)       # <stats_dir> for <stats_dir>/<model>
    refused(tmp_path / "stats_dir", (1,), f"no statistics for layer 1 .*; {tmp_path / 'stats_dir' / 'stories'} has "
                                          "them: give --stats that folder")
    skew = np.triu(np.ones((172, 172)))
    refused(their_file(tmp_path / "d", 1, S_=skew), (1,), "not a finite symmetric matrix")
    pickled = tmp_path / "e" / "model.layers.1.mlp.down_proj_float64_mom2_100000.npz"
    pickled.parent.mkdir()
    np.savez(pickled, **{"mom2.mom2": np.array([{"a": 1}], dtype=object), "mom2.count": np.array(3)})
    refused(pickled, (1,), "mom2.mom2 or .count needs unpickling; refused")
    broken = tmp_path / "f" / "model.layers.1.mlp.down_proj_float64_mom2_100000.npz"
    broken.parent.mkdir()
    broken.write_bytes(f1.read_bytes()[:500])
    refused(broken.parent, (1,), "not a readable .npz file")
    refused(tmp_path / "nowhere", (1,), "no such file or directory")
    for i, count in enumerate((np.inf, "abc", np.array([3, 4]), 2.5)):            # inf, text: were tracebacks
        refused(their_file(tmp_path / f"count{i}", 1, count=count), (1,), "mom2.count is .*not a token count")
    text = tmp_path / "g" / "model.layers.1.mlp.down_proj_float64_mom2_100000.npz"
    text.parent.mkdir()
    text.write_text("hello")                         # was: "This file contains pickled (object) data"
    refused(text, (1,), r"not a readable .npz file \(not a whole zip archive of arrays")
    their_file(tmp_path / "h" / "wikipedia_stats", 1)
    their_file(tmp_path / "h" / "wikitext_stats", 1)                 # the same name twice: named by folder
    refused(tmp_path / "h", (1,), r"layer 1 has 2 mom2 files \(wikipedia_stats/.*\.npz, wikitext_stats/.*\.npz\)")


def test_their_count_of_exactly_the_mlp_width_is_taken(tmp_path, stories):
    """A count of d_mlp tokens (172) is taken, as a corpus of that many is (corpus_sequences);
    171 is refused (test_their_files_that_do_not_fit_are_refused)."""
    file = their_file(tmp_path, 1, count=172)
    with np.load(file, allow_pickle=False) as z:
        total = torch.from_numpy(z["mom2.mom2"])
    C = S.load_stats_file(file, stories, STORIES, (1,), log=quiet)
    assert torch.equal(C[1], (total + total.T) / 2 / 172)


def test_their_sum_is_taken_symmetric_to_its_precision_and_no_further(tmp_path, stories):
    """Their float64 sum may differ from its transpose by rounding (a GPU product), not more: an
    asymmetry of 1e-10 of the largest entry is taken (and averaged away), one of 1e-6 (beyond
    √ε = 1.5e-8) refused as not symmetric."""
    k = torch.randn(300, 172, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sym = k.T @ k
    sym = sym.tril() + sym.tril(-1).T
    skew = torch.zeros(172, 172, dtype=torch.float64)
    skew[5, 9] = float(sym.abs().max())
    taken = their_file(tmp_path / "a", 1, S_=(sym + 1e-10 * skew).numpy())
    assert torch.allclose(S.load_stats_file(taken, stories, STORIES, (1,), log=quiet)[1], sym / 1234, rtol=0,
                          atol=1e-9 * float(sym.abs().max()) / 1234)
    with pytest.raises(S.StatisticsError, match="mom2.mom2 is not a finite symmetric matrix"):
        S.load_stats_file(their_file(tmp_path / "b", 1, S_=(sym + 1e-6 * skew).numpy()), stories, STORIES, (1,),
                          log=quiet)


def test_their_half_precision_sum_is_refused(tmp_path, stories):
    """A float16 sum (their precision argument allows it) is no float32/float64 one: summed over
    their 100,000 tokens it is rounded far beyond C's use, or overflows; refused, as --plan does."""
    native = their_file(tmp_path / "a", 1)
    with np.load(native, allow_pickle=False) as z:
        total = z["mom2.mom2"]
    half = their_file(tmp_path / "b", 1, S_=total.astype(np.float16))
    with pytest.raises(S.StatisticsError, match=r"mom2.mom2 is float16 \(172, 172\); a float \(172, 172\) sum is needed"):
        S.load_stats_file(half, stories, STORIES, (1,), log=quiet)
    cfg = M.Config.from_hf(json.loads((STORIES / "config.json").read_text()))
    with pytest.raises(S.StatisticsError, match="mom2.mom2 is float16"):
        S.check_authors_files(tmp_path / "b", cfg, (1,))


def test_their_big_endian_file_is_read_as_the_native_one(tmp_path, stories):
    """A float64 sum stored big-endian (>f8) is a float sum (it was refused as not one)."""
    native = their_file(tmp_path / "a", 1)
    with np.load(native, allow_pickle=False) as z:
        total = z["mom2.mom2"]
    their_file(tmp_path / "b", 1, S_=total.astype(">f8"))
    got = S.load_stats_file(tmp_path / "b", stories, STORIES, (1,), log=quiet)[1]
    assert torch.equal(got, S.load_stats_file(tmp_path / "a", stories, STORIES, (1,), log=quiet)[1])


def test_their_sum_holding_a_nan_or_an_infinity_is_refused(tmp_path, stories):
    """A NaN or inf in their sum escapes the symmetry test (NaN compares false; inf − inf is NaN):
    the finiteness check refuses it."""
    k = torch.randn(300, 172, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    sym = (k.T @ k).tril() + (k.T @ k).tril(-1).T
    for i, bad in enumerate((float("nan"), float("inf"))):
        with pytest.raises(S.StatisticsError, match="mom2.mom2 is not a finite symmetric matrix"):
            S.load_stats_file(their_file(tmp_path / str(i), 1, S_=sym.clone().fill_diagonal_(bad).numpy()), stories,
                              STORIES, (1,), log=quiet)


def test_the_module_never_unpickles():
    src = (HERE / "stats.py").read_text()
    assert "torch.load" not in src and "import pickle" not in src
    assert src.count("np.load(") == src.count("np.load(file, allow_pickle=False)") == 2


# ----------------------------------------------------------------------------- many processes

def order_bound(C, batches: int) -> torch.Tensor:
    """How far two float64 sums of the same `batches` batch terms, added in different orders and
    divided by N, can be apart: 2 (batches) 2⁻⁵³ Σ|k_i k_j| / N, and Σ|k_i k_j| / N ≤ √(C_ii C_jj)."""
    d = C.diagonal()
    return batches * 2.0 ** -52 * (d[:, None] * d[None, :]).sqrt()


def test_shards_sum_to_the_whole(stories, monkeypatch):
    """Batches dealt round-robin to 3 ranks, their buffers added: C and the token count as one pass."""
    seqs = S.stats_sequences(stories.tokenizer, data.read_corpus(CORPUS), 3000)
    parts = [S.gram_sums(stories, seqs, [1, 2], 700, rank=r, world=3) for r in range(3)]
    assert [int(p[-1]) for p in parts] != [1000] * 3 and sum(int(p[-1]) for p in parts) == 3000
    C = S.finish_sums(sum(parts), [1, 2])
    whole = S.collect_stats(stories, seqs, [1, 2], batch_tokens=700)
    batches = len(S.length_batches([len(s) for s in seqs], 700))
    assert all(bool((C[l] - whole[l]).abs().le(order_bound(whole[l], batches)).all()) for l in (1, 2))
    monkeypatch.setattr(S.dist, "all_reduce", lambda t: None)            # a reduce that lost the others
    with pytest.raises(S.StatisticsError, match=f"the ranks summed {int(parts[0][-1])} tokens, the corpus has 3000"):
        S.collect_stats(stories, seqs, [1, 2], 700, rank=0, world=3)


def test_ranks_that_summed_more_tokens_than_the_corpus_are_refused(stories, monkeypatch):
    """Shares that overlap (here rank 1 summed every batch, not its own) give more tokens than the
    corpus, not fewer: refused as well, never divided into a C."""
    seqs = S.stats_sequences(stories.tokenizer, data.read_corpus(CORPUS), 600)
    mine = S.rank_share(seqs, 200, 0, 2)
    monkeypatch.setattr(S.dist, "all_reduce", lambda t: t.add_(S.gram_sums(stories, seqs, [1], 200)))
    with pytest.raises(S.StatisticsError, match=f"the ranks summed {mine + 600} tokens, the corpus has 600"):
        S.collect_stats(stories, seqs, [1], 200, rank=0, world=2)


def test_each_rank_s_share_is_its_round_robin_batches_tokens():
    """Lengths 1..6 in batches of at most 6 padded tokens: [1, 2], [3], [4], [5], [6] (3, 3, 4, 5, 6
    tokens); two ranks take batches 0, 2, 4 (13 tokens) and 1, 3 (8): the shares add up to the
    corpus, which one process takes whole (Progress's total on rank 0)."""
    seqs = [[7] * n for n in (4, 1, 6, 2, 5, 3)]
    assert S.length_batches([len(s) for s in seqs], 6) == [[1, 3], [5], [0], [4], [2]]
    assert [S.rank_share(seqs, 6, r, 2) for r in range(2)] == [13, 8]
    assert [S.rank_share(seqs, 6, r, 5) for r in range(5)] == [3, 3, 4, 5, 6]
    assert S.rank_share(seqs, 6) == 21


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_equal_one_to_summation_order(tmp_path, stories):
    """torchrun, 2 processes on the CPU (gloo), against 1 process on the same corpus, both on one
    thread. Each batch's keys and Σ k kᵀ are the same in both (same batches); only the order in
    which the float64 batch sums are added differs (order_bound)."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    two = tmp_path / "two.safetensors"
    run = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                            "--master-port", str(free_port()), str(HERE / "stats.py"), "stats", "--model",
                            str(STORIES), "--layers", "1,2", "--stats-tokens", "4000", "--batch-tokens", "500",
                            "--out", str(two)], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:                                                  # meanwhile, the one-process C here
        seqs = S.stats_sequences(stories.tokenizer, data.read_corpus(CORPUS), 4000)
        one = S.collect_stats(stories, seqs, [1, 2], batch_tokens=500)
    finally:
        torch.set_num_threads(threads)
    out, err = run.communicate(timeout=120)
    assert run.returncode == 0, err
    assert out.count("statistics: 4,000 tokens in ") == 1 and " on 2 processes" in out   # rank 0 alone speaks
    assert "(rank 0's share of 2 processes)" in err
    C2 = load_file(str(two))
    batches = len(S.length_batches([len(s) for s in seqs], 500))
    for l in (1, 2):
        assert bool((C2[f"C.{l}"] - one[l]).abs().le(order_bound(one[l], batches)).all())
    with safe_open(str(two), "pt") as f:
        assert json.loads(f.metadata()["key"]) == S.stats_key(STORIES, stories, [1, 2], CORPUS, 4000, 256)
        assert f.metadata()["tokens"] == "4000"


def two_ranks(cwd: Path, argv) -> tuple[list[int], list[str]]:
    """Two gloo processes started as torchrun would (without its agent), rank r running python
    with argv(r): their exit codes and stderr."""
    env = os.environ | dict(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                            WORLD_SIZE="2")
    ranks = [subprocess.Popen([sys.executable, *argv(r)], env=env | dict(RANK=str(r), LOCAL_RANK=str(r)), cwd=cwd,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        errs = [r.communicate(timeout=120)[1] for r in ranks]
    finally:
        for r in ranks:
            r.kill()
    return [r.returncode for r in ranks], errs


def test_torchrun_s_environment_gives_rank_world_and_local_rank(monkeypatch):
    """(RANK, WORLD_SIZE, LOCAL_RANK) as torchrun sets them: on the second node of two, rank 5 is
    local rank 1 (its cuda:1), not 5; without both RANK and WORLD_SIZE, one process."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert S.torchrun_env() == (0, 1, 0)
    monkeypatch.setenv("RANK", "5")
    assert S.torchrun_env() == (0, 1, 0)                 # RANK alone: not torchrun's
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert S.torchrun_env() == (5, 8, 0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert S.torchrun_env() == (5, 8, 1)
    monkeypatch.delenv("RANK")
    assert S.torchrun_env() == (0, 1, 0)                 # WORLD_SIZE alone neither


def test_each_torchrun_process_takes_its_local_rank_s_gpu_and_one_device(monkeypatch):
    """Under torchrun --device cuda is cuda:LOCAL_RANK; a numbered GPU (every process on it) or a
    list is refused; cpu stays cpu. One process keeps --device as given (a list too). (CUDA is
    faked: only the names are checked.)"""
    real = M.check_device
    monkeypatch.setattr(M, "check_device", lambda d: torch.device(d) if str(d).startswith("cuda") else real(d))
    assert S.rank_device("cuda", 2, 1) == "cuda:1" and S.rank_device("cuda", 4, 3) == "cuda:3"
    assert S.rank_device("cpu", 2, 1) == "cpu"
    with pytest.raises(ValueError, match="under torchrun each process takes cuda:LOCAL_RANK; give --device cuda"):
        S.rank_device("cuda:0", 2, 1)
    with pytest.raises(ValueError, match="give one device here .*not a list"):
        S.rank_device("cpu,cpu", 2, 0)
    assert S.rank_device("cpu,cpu", 1, 0) == "cpu,cpu"


def test_when_rank_0_cannot_write_the_file_every_rank_leaves_with_one_line(tmp_path):
    """Two gloo processes (started as torchrun would, without its agent), rank 0's disk full at
    the write: every rank learns it and leaves with one error line; rank 1 used to die in gloo
    with a traceback once rank 0 had left."""
    script = tmp_path / "full_disk.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(HERE)!r})\nimport stats\n\n\n"
                      "def full(*a, **k):\n    raise OSError(28, 'No space left on device')\n\n\n"
                      "stats.write_stats_file = full\nsys.exit(stats.main(sys.argv[1:]))\n")
    out = tmp_path / "C.safetensors"
    codes, errs = two_ranks(tmp_path, lambda r: [str(script), "--model", str(STORIES), "--layers", "1",
                                                 "--stats-tokens", "1000", "--batch-tokens", "300", "--out", str(out)])
    reason = "[Errno 28] No space left on device"
    assert codes == [1, 1], errs
    assert errs[1] == f"error (rank 1): rank 0 could not write {out}: {reason}\n"
    assert errs[0].splitlines()[-1] == f"error (rank 0): could not write {out}: {reason}" and "Traceback" not in errs[0]
    assert not out.exists()


def test_ranks_that_read_other_weights_or_settings_are_refused_before_any_sum(tmp_path):
    """Two gloo processes, rank 1 given another checkpoint at its path (a node's copy) or another
    --stats-tokens: every rank leaves with one line naming what differs, and no file is written.
    Only the token counts were compared: the other weights' sums were added under rank 0's key
    (C 40% off, accepted later), and another count failed on one rank with a gloo traceback."""
    other = tmp_path / "other"
    shutil.copytree(STORIES, other)
    tensors = load_file(str(other / "model.safetensors"))
    tensors["model.layers.0.mlp.up_proj.weight"] *= 1.5
    save_file(tensors, str(other / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "C.safetensors"
    for rank_1, differs in ((["--model", str(other)], "the tensors model.layers.0.mlp.up_proj.weight"),
                            (["--stats-tokens", "900"], "n_tokens"),
                            (["--batch-tokens", "512"], "batch_tokens"),    # (a share of other batches: C 21% off)
                            (["--state-device", "cpu"], "state_device")):   # (other passes: all_reduces unpaired)
        args = ["--model", str(STORIES), "--layers", "1", "--stats-tokens", "1000", "--out", str(out)]
        codes, errs = two_ranks(tmp_path, lambda r: [str(HERE / "stats.py"), *args, *(rank_1 if r else [])])
        assert codes == [1, 1], errs
        for r in range(2):
            assert errs[r] == (f"error (rank {r}): rank 1 read other inputs than rank 0 ({differs} differ): every "
                               "process must read the same model, tokenizer and corpus with the same settings\n")
        assert not list(tmp_path.glob("C.safetensors*"))


def test_a_statistics_file_is_not_written_as_npz_and_is_read_as_ours_by_its_content(made, stories, tmp_path,
                                                                                      monkeypatch, capsys):
    """`stats --out C.npz` wrote a file that --stats then read as the MEMIT/ROME code's (by its
    name) and refused: .npz is refused for --out, and a statistics file of another name is read as
    what it holds."""
    load = S.M.load
    monkeypatch.setattr(S.M, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    assert S.main(["--model", str(STORIES), "--out", str(tmp_path / "C.npz")]) == 1
    assert capsys.readouterr().err == (f"error: --out {tmp_path / 'C.npz'}: a statistics file is safetensors; .npz "
                                       f"names the MEMIT/ROME code's layer files: give e.g. {tmp_path / 'C.safetensors'}\n")
    renamed = tmp_path / "C.npz"
    shutil.copy(made, renamed)
    C = S.load_stats_file(renamed, stories, STORIES, [1, 2], log=quiet)
    assert all(torch.equal(C[l], load_file(str(made))[f"C.{l}"]) for l in (1, 2))
    monkeypatch.setattr(S.M, "load", load)
    import lyaplock                                  # the run's record of its inputs and --plan, too
    edit = ["--model", str(STORIES), "--edits", str(FIX / "counterfact-rome.json"), "--limit", "2", "--batch-size",
            "2", "--layers", "1,2", "--stats", str(renamed), "--no-generation"]
    assert lyaplock.main([*edit, "--plan"]) == 0
    assert lyaplock.main([*edit, "--out", str(tmp_path / "run")]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("entry", ["stats.py", "lyaplock.py stats", "editing"])
def test_sigterm_during_the_write_leaves_no_temporary_file(entry, tmp_path, monkeypatch, capsys):
    """torchrun's agent stops the other ranks with SIGTERM when one fails, `timeout` and `kill` send
    it: the statistics file's temporary (a layer-set of C; gigabytes) was left beside --out or in
    the cache. Both commands now leave through Python's shutdown (exit 143), which removes it."""
    import signal
    import lyaplock
    real = S.os.replace
    def killed(*a):                                           # the temporary is whole: the rename is next
        if str(a[0]).endswith(".tmp") and ".safetensors." in str(a[0]):
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a)
    def outer(*a):
        raise AssertionError("the SIGTERM reached the caller's handler")
    monkeypatch.setattr(S.os, "replace", killed)
    previous = signal.signal(signal.SIGTERM, outer)
    try:
        with pytest.raises(SystemExit) as stop:
            if entry != "editing":               # (python stats.py and torchrun call stats.main itself)
                main = S.main if entry == "stats.py" else lambda argv: lyaplock.main(["stats", *argv])
                main(["--model", str(STORIES), "--layers", "1", "--stats-tokens", "1000",
                      "--out", str(tmp_path / "out" / "C.safetensors")])
            else:
                lyaplock.main(["--model", str(STORIES), "--edits", str(FIX / "stories-edits.json"), "--limit", "1",
                               "--layers", "1", "--stats-tokens", "1000", "--stats-cache", str(tmp_path / "out"),
                               "--out", str(tmp_path / "run"), "--no-generation"])
        assert signal.getsignal(signal.SIGTERM) is outer                       # put back
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stop.value.code == 128 + signal.SIGTERM and list((tmp_path / "out").iterdir()) == []
    assert capsys.readouterr().err.endswith("\nstopped (SIGTERM): no statistics file written\n" if entry != "editing"
                                            else "\nstopped (SIGTERM); before the run directory was made: nothing to "
                                                 "continue\n")                   # (was: nothing said)


def test_the_sigterm_handler_is_set_once_and_only_in_the_main_thread():
    """Nested commands (lyaplock.py stats) keep the outer handler, so a second SIGTERM while the
    first unwinds stays ignored; a call from another thread (a notebook's, a GUI's) works: it
    was signal's ValueError ("signal only works in main thread") for every command."""
    import signal
    import threading
    import lyaplock
    before = signal.getsignal(signal.SIGTERM)
    with data.sigterm_exits():
        assert signal.getsignal(signal.SIGTERM) is data.exit_on_sigterm
        signal.signal(signal.SIGTERM, signal.SIG_IGN)                  # (exit_on_sigterm's first act)
        with data.sigterm_exits():
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    assert signal.getsignal(signal.SIGTERM) is before
    codes = []
    worker = threading.Thread(target=lambda: codes.append(lyaplock.main(["report", "/nonexistent/run"])))
    worker.start()
    worker.join()
    assert codes == [1]


def test_lyaplock_stats_then_an_editing_run_with_the_file_equals_the_cached_run(tmp_path, capsys):
    """`lyaplock.py stats` writes the file; `--stats FILE` uses it (after checking its key) and
    edits exactly as a run that collects the same statistics itself."""
    from test_lyaplock import _cli, _final_weights
    import lyaplock as L
    file = tmp_path / "C.safetensors"
    assert L.main(["stats", "--model", str(STORIES), "--stats-tokens", "4000", "--layers", "1,2",
                   "--out", str(file)]) == 0
    assert "statistics: 4,000 tokens" in capsys.readouterr().out
    for name, extra in (("cached", []), ("file", ["--stats", str(file)])):
        tokens = 0 if extra else 4000                 # the file holds its token count: the flag is refused
        assert L.main(_cli(tmp_path, "--out", str(tmp_path / name), "--limit", "4", "--no-generation", *extra,
                           tokens=tokens)) == 0
    a, b = _final_weights(tmp_path / "cached"), _final_weights(tmp_path / "file")
    assert all(torch.equal(a[k], b[k]) for k in a)
    recorded = {name: json.loads((tmp_path / name / "config.json").read_text()) for name in ("cached", "file")}
    assert recorded["file"]["stats_file"] == str(file.resolve())
    corpus_fields = {"stats_corpus", "stats_tokens", "stats_batch_tokens"}   # read only without --stats
    assert corpus_fields <= set(recorded["cached"]) and not corpus_fields & set(recorded["file"])
    other = tmp_path / "C12.safetensors"
    assert L.main(["stats", "--model", str(STORIES), "--stats-tokens", "4000", "--layers", "1", "--out", str(other)]) == 0
    assert L.main(_cli(tmp_path, "--out", str(tmp_path / "bad"), "--limit", "4", "--stats", str(other), tokens=0)) == 1
    assert "layer" in capsys.readouterr().err
    cut = tmp_path / "cut.safetensors"                 # a statistics file cut short: named as such
    cut.write_bytes(file.read_bytes()[:100])
    assert L.main(_cli(tmp_path, "--out", str(tmp_path / "cut"), "--limit", "4", "--stats", str(cut), tokens=0)) == 1
    assert "not a readable statistics file (truncated or corrupt?)" in capsys.readouterr().err
    for flag, value in (("--stats-tokens", "500"), ("--stats-corpus", str(FIX / "wikitext-2-test-sample.txt")),
                        ("--stats-batch-tokens", "512")):
        assert L.main(_cli(tmp_path, "--out", str(tmp_path / "both"), "--stats", str(file), flag, value, tokens=0)) == 1
        assert capsys.readouterr().err.startswith(f"error: {flag} with --stats: the file holds the statistics")
        assert not (tmp_path / "both").exists()


def test_a_run_s_start_reads_each_weight_once_for_its_inputs_and_its_statistics(tmp_path, monkeypatch, made):
    """inputs.json and the statistics' key (a file's check, a cache's key) hash the same tensors:
    a run's start reads them once (the second hashing reuses the first's digests)."""
    from test_lyaplock import _cli
    import builtins
    import lyaplock as L
    weights = str(STORIES / "model.safetensors")
    opened = []
    monkeypatch.setattr(S, "open", lambda f, *a, **k: (opened.append(str(f)), builtins.open(f, *a, **k))[1],
                        raising=False)
    for name, extra in (("cached", []), ("file", ["--stats", str(made)])):
        opened.clear()
        assert L.main(_cli(tmp_path, "--out", str(tmp_path / name), "--limit", "2", "--no-generation", *extra,
                           tokens=0 if extra else 3000)) == 0
        assert opened.count(weights) == 1, (name, opened)
    names, known = M.load(STORIES).names_through_layer(1), {}
    assert S.tensor_digests(STORIES, names, known) == S.tensor_digests(STORIES, names) == {n: d for (_, n), d in known.items()}


def test_a_resume_whose_statistics_file_was_moved_says_so(tmp_path, made, monkeypatch, capsys):
    """It said "not a readable statistics file (truncated or corrupt?): No such file or directory"."""
    from test_lyaplock import _cli, interrupt_after_one_step
    import lyaplock as L
    moved = tmp_path / "C.safetensors"
    shutil.copy(made, moved)
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        interrupt_after_one_step(patch)
        assert L.main(_cli(tmp_path, "--out", str(out), "--limit", "4", "--batch-size", "2", "--no-generation",
                           "--stats", str(moved), tokens=0)) == 130
    kept = moved.read_bytes()
    moved.unlink()
    capsys.readouterr()
    assert L.main(["--resume", str(out)]) == 1
    assert f"{moved}: no such statistics file" in capsys.readouterr().err
    moved.write_bytes(kept)                            # back in place: the run goes on from its config.json
    capsys.readouterr()
    for flag, value in (("--stats-tokens", "0"), ("--stats-corpus", str(CORPUS)), ("--stats-batch-tokens", "512")):
        assert L.main(["--resume", str(out), flag, value]) == 1       # (was: "stats_tokens: None in the run, 0 now")
        assert capsys.readouterr().err == (f"error: {flag}: the run reads its statistics from its --stats file "
                                           f"{moved.resolve()}; the flag would be recorded, not used\n")
    assert L.main(["--resume", str(out)]) == 0


def test_a_cache_that_cannot_take_the_statistics_leaves_them_to_the_run(tmp_path, stories, monkeypatch):
    """A read-only or full --stats-cache: the pass's C serves the run, with a line (it stopped the run
    after the whole pass)."""
    monkeypatch.setattr(S, "write_stats_file", lambda *a, **k: (_ for _ in ()).throw(OSError(30, "Read-only file system")))
    lines = []
    C = S.load_or_collect_stats(stories, STORIES, CORPUS, 400, (1,), tmp_path / "ro", log=lambda s, end="\n": lines.append(s))
    assert set(C) == {1} and any(f"statistics: not cached, {tmp_path / 'ro'} cannot take them (Read-only file system)"
                                 in line for line in lines)


def test_a_corpus_shorter_than_the_mlp_width_is_refused_before_the_pass(tmp_path, stories, monkeypatch):
    corpus = tmp_path / "short.txt"
    corpus.write_text("Once upon a time there was a girl.\nShe liked the sun.\n")
    monkeypatch.setattr(S, "collect_stats", lambda *a, **k: pytest.fail("the pass ran"))
    with pytest.raises(S.StatisticsError, match=r"has \d+ tokens; C \(172×172\) needs at least d_mlp = 172"):
        S.load_or_collect_stats(stories, STORIES, corpus, 0, (1,), tmp_path, log=quiet)


def test_a_corpus_of_exactly_the_mlp_width_is_taken_and_one_token_fewer_refused(stories):
    """d_mlp tokens (172 on stories260K) can make a C of full rank, so they are taken; 171 cannot,
    and are refused (the bound is d_mlp itself, not d_mlp + 1)."""
    seqs, total = S.corpus_sequences(stories, CORPUS, 172, 256)
    assert total == sum(map(len, seqs)) == 172
    with pytest.raises(S.StatisticsError, match=r"171 tokens taken \(--stats-tokens 171\); C \(172×172\) needs"):
        S.corpus_sequences(stories, CORPUS, 171, 256)


def test_a_singular_C_is_said_where_it_is_collected(tmp_path, stories, capsys):
    """A repetitive corpus (or a --max-len of 1: every key the BOS token's) gives a C of low rank:
    LyapLock refused it only at its first step, after the scoring before editing, and AlphaEdit
    took it without a word (written and cached silently). Said by the command and by a run's
    collection, naming the layers, the tokens and the corpus."""
    corpus = tmp_path / "same.txt"
    corpus.write_text("Once upon a time there was a girl.\n" * 40)
    lines = []
    C = S.load_or_collect_stats(stories, STORIES, corpus, 0, (1, 2), tmp_path / "cache",
                                log=lambda line, end="\n": lines.append(line))
    assert [l for l in lines if l.startswith("warning")] == [
        f"warning: the statistics C of layer(s) 1, 2 are singular: the 480 tokens of {corpus} give too few different "
        "keys (a short or repetitive corpus, or a --max-len that keeps little more than each text's first token); "
        "LyapLock, MEMIT and the others that solve with C refuse it at their first step, and AlphaEdit's null "
        "space would be most of the space: use a larger, varied corpus"]
    assert int(torch.linalg.matrix_rank(C[1])) < 172
    no_room = SimpleNamespace(trace=lambda: torch.tensor(1.0),
                              to=lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("CUDA out of memory")))
    assert S.singular_warning({1: C[1], 2: no_room}, corpus, 480).startswith(   # no room for the check: the layers
        "warning: the statistics C of layer(s) 1 are singular")                  # found so far (was: the OOM raised)
    assert S.singular_warning({2: no_room}, corpus, 480) is None
    assert S.main(["--model", str(STORIES), "--max-len", "1", "--stats-tokens", "400", "--out", str(tmp_path / "s")]) == 0
    assert "warning: the statistics C of layer(s) 1, 2 are singular: the 400 tokens of " in capsys.readouterr().err


def test_the_singular_check_is_relative_to_the_scale_of_C():
    """Singular means an eigenvalue under ε·tr(C), whatever C's scale: a well-conditioned C of tiny
    entries (1e-20 I) is not, and diag(1, 1, 1e-17) is (1e-17 < ε · 2 = 4.4e-16), times 1 or 1e6 alike."""
    for scale in (1.0, 1e6):
        assert S.singular_warning({3: scale * torch.diag(torch.tensor([1.0, 1.0, 1e-17], dtype=torch.float64))},
                                  "c.txt", 9).startswith("warning: the statistics C of layer(s) 3 are singular")
    assert S.singular_warning({3: 1e-20 * torch.eye(3, dtype=torch.float64)}, "c.txt", 9) is None
    assert S.singular_warning({3: torch.eye(3, dtype=torch.float64)}, "c.txt", 9) is None


@pytest.mark.parametrize("flag", ["--max-len", "--batch-tokens", "--stats-batch-tokens"])
def test_stats_lengths_of_zero_are_refused_before_the_model_loads(tmp_path, monkeypatch, capsys, flag):
    """A --max-len or --batch-tokens of 0 would cut every paragraph away or take one sequence a
    batch: one line, before the model loads (1 is the least taken)."""
    monkeypatch.setattr(S.M, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    out = str(tmp_path / "s.safetensors")
    assert S.main(["--model", str(STORIES), "--out", out, flag, "0"]) == 1
    name = "--max-len" if flag == "--max-len" else "--batch-tokens"
    assert capsys.readouterr().err == f"error: {name} must be at least 1, got 0\n"
    assert S.parse_args(["--model", str(STORIES), "--out", out, flag, "1"])


def test_stats_path_flags_given_as_an_empty_string_are_refused_naming_them(tmp_path, monkeypatch, capsys):
    """'' is no path: --model '' read the working directory ("./config.json is missing"), --out ''
    was called a directory; each is one line naming the flag, before the model loads."""
    monkeypatch.setattr(S.M, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    out = str(tmp_path / "s.safetensors")
    for flags, message in ((["--model", "", "--out", out], "--model '': give a directory"),
                           (["--model", str(STORIES), "--out", ""], "--out '': give a file"),
                           (["--model", str(STORIES), "--out", out, "--stats-corpus", ""], "--stats-corpus '': give a file")):
        assert S.main(flags) == 1
        assert capsys.readouterr().err == f"error: {message}\n"
    assert not (tmp_path / "s.safetensors").exists()


def test_stats_out_that_is_a_directory_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    """It used to collect the whole corpus, then fail in os.replace with a traceback."""
    monkeypatch.setattr(S.M, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    assert S.main(["--model", str(STORIES), "--out", str(tmp_path)]) == 1
    assert capsys.readouterr().err == (f"error: --out {tmp_path} is a directory; give the file to write, "
                                       f"e.g. {tmp_path / 'stats.safetensors'}\n")


def test_stats_out_in_a_folder_that_cannot_be_written_is_refused_before_the_model_loads(tmp_path, monkeypatch,
                                                                                       capsys):
    """Missing folders are made; one under a file, or in a directory not writable, is refused."""
    monkeypatch.setattr(S.M, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = blocker / "sub" / "C.safetensors"
    assert S.main(["--model", str(STORIES), "--out", str(out)]) == 1
    assert capsys.readouterr().err == f"error: --out {out}: {blocker} is a file, not a directory\n"
    monkeypatch.setattr(S.os, "access", lambda path, mode: path != tmp_path)     # as a user without rights
    out = tmp_path / "new" / "C.safetensors"
    assert S.main(["--model", str(STORIES), "--out", str(out)]) == 1
    assert capsys.readouterr().err == f"error: --out {out}: the directory {tmp_path} is not writable\n"


def test_stats_out_never_writes_over_the_checkpoint_or_a_file_that_is_not_statistics(tmp_path, monkeypatch,
                                                                                       capsys):
    """`--out <model>/model.safetensors` replaced the weights (and `--out <model>/config.json` the
    config): a path in the checkpoint, or an existing file that is not a statistics file, is
    refused before the model loads; an earlier statistics file is written over."""
    model = tmp_path / "model"
    shutil.copytree(STORIES, model)
    before = {f.name: f.read_bytes() for f in model.iterdir() if f.is_file()}
    load = S.M.load
    monkeypatch.setattr(S.M, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    for out in (model / "model.safetensors", model / "config.json", model / "stats" / "C.safetensors"):
        assert S.main(["--model", str(model), "--out", str(out)]) == 1
        assert capsys.readouterr().err == (f"error: --out {out} is inside --model {model}: keep the statistics "
                                           "file apart from the checkpoint (it would replace or add to the "
                                           "checkpoint's files)\n")
    other = tmp_path / "notes.txt"
    other.write_text("mine")
    assert S.main(["--model", str(model), "--out", str(other)]) == 1
    assert capsys.readouterr().err == (f"error: --out {other} exists and is not a statistics file: give a new "
                                       "path (only an earlier statistics file is written over)\n")
    assert other.read_text() == "mine"
    assert {f.name: f.read_bytes() for f in model.iterdir() if f.is_file()} == before
    monkeypatch.setattr(S.M, "load", load)
    out = tmp_path / "C.safetensors"
    for tokens in ("2000", "3000"):      # the second run writes over the first's file (the editing name too)
        assert S.main(["--model", str(model), "--out", str(out), "--layers", "1", "--stats-tokens", tokens,
                       "--stats-batch-tokens", "4096"]) == 0
    assert file_key(out)["n_tokens"] == 3000


def test_stats_ctrl_c_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    def interrupt(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(S, "collect_stats", interrupt)
    assert S.main(["--model", str(STORIES), "--out", str(tmp_path / "C.safetensors")]) == 130
    assert capsys.readouterr().err.endswith("interrupted: no statistics file written\n")
    assert not list(tmp_path.iterdir())


def test_a_max_len_beyond_gpt2_s_learned_positions_is_capped_and_said(tmp_path, capsys):
    """A GPT-2 of 64 learned positions, the default --max-len 256: the paragraphs are cut to 64
    tokens before the pass, in the command and in an editing run's collection alike, and the key
    says 64; it used to fail in the last (longest) batch, after all the others' work."""
    from test_models import make_checkpoint
    path = make_checkpoint(tmp_path / "gpt2", "gpt2")
    gpt2 = M.load(path)
    assert max(map(len, S.stats_sequences(gpt2.tokenizer, data.read_corpus(CORPUS), 2000, 256))) > 64
    out = tmp_path / "C.safetensors"
    assert S.main(["--model", str(path), "--layers", "1", "--stats-tokens", "2000", "--out", str(out)]) == 0
    said = "statistics: paragraphs cut to 64 tokens, not 256: this GPT-2 has 64 learned positions"
    assert said in capsys.readouterr().err
    assert file_key(out)["max_len"] == 64
    logs = []
    C = S.load_or_collect_stats(gpt2, path, CORPUS, 2000, (1,), tmp_path / "cache", log=lambda s, **k: logs.append(s))
    assert logs[0].startswith(said) and torch.equal(C[1], load_file(str(out))["C.1"])


def test_a_max_len_beyond_longrope_s_trained_length_is_capped_and_said(tmp_path):
    """LongRoPE (Phi-3) turns a pass longer than original_max_position_embeddings by other factors:
    paragraphs past it would give the longest batches other keys than the rest; they are cut to it,
    said in a line. Other models' paragraphs keep --max-len (beyond GPT-2's learned positions)."""
    from test_models import make_checkpoint
    phi3 = M.load(make_checkpoint(tmp_path / "phi3", "phi3-longrope-window"))        # trained on 8 of 64
    logs = []
    assert S.positions_cap(phi3.cfg, 256, logs.append) == 8
    assert logs == ["statistics: paragraphs cut to 8 tokens, not 256: LongRoPE turns a longer pass by its "
                    "long factors (original_max_position_embeddings)"]
    assert S.positions_cap(phi3.cfg, 8, logs.append) == 8 and len(logs) == 1
    phi3 = M.load(make_checkpoint(tmp_path / "phi3-plain", "phi3"))                      # plain rope, 256 positions
    assert S.positions_cap(phi3.cfg, 4096, logs.append) == 4096 and len(logs) == 1
