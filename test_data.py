"""Tests of data.py: the edit datasets (CounterFact in ROME's and EasyEdit's layouts, zsRE in MEND's) and corpora
are read exactly and bad input is refused with the file, record and field named. Run:
python -m pytest -q test_data.py"""
import ast
import copy
import dataclasses
import gzip
import hashlib
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest

import data
from data import DataError, Request, file_sha256, load_requests, read_corpus
from test_lyaplock import FIX


ROME_REC = {
    "case_id": 7,
    "requested_rewrite": {"prompt": "The capital of {} is", "subject": "France",
                          "target_new": {"str": "Rome", "id": "Q220"},
                          "target_true": {"str": "Paris", "id": "Q90"}},
    "paraphrase_prompts": ["France has its capital in"],
    "neighborhood_prompts": ["The capital of the French Republic is", "France's seat of government is"],
    "attribute_prompts": ["The capital of Italy is"],
    "generation_prompts": ["France's capital city"],
}
EASY_REC = {"case_id": 7, "prompt": "The capital of France is", "target_new": "Rome",
            "subject": "France", "ground_truth": "Paris",
            "rephrase_prompt": "France has its capital in",
            "locality_prompt": "The capital of the French Republic is",
            "locality_ground_truth": "Paris"}
ZSRE_REC = {"subject": "France", "src": "What is the capital of France?", "pred": "Paris",
            "rephrase": "Which city is the capital of France?", "alt": "Rome", "answers": ["Paris"],
            "loc": "nq question: who wrote hamlet", "loc_ans": "William Shakespeare",
            "cond": "Paris >> Rome || What is the capital of France?"}


def _data_write(tmp_path, obj, name="edits.json"):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj), encoding="utf-8")
    return path


def _data_error(path, *parts, **kwargs):
    """Loading ``path`` raises a DataError whose message has the file name and all ``parts``."""
    with pytest.raises(DataError) as info:
        load_requests(path, **kwargs)
    msg = str(info.value)
    for part in (path.name, *parts):
        assert part in msg, f"{part!r} not in {msg!r}"
    return msg


def test_data_easyedit_and_rome_layouts_give_the_same_requests():
    rome, _ = load_requests(FIX / "counterfact-rome.json")
    easy = {r.case_id: r for r in load_requests(FIX / "counterfact-easyedit.json")[0]}
    assert len(rome) == 20
    for r in rome:
        e = easy[r.case_id]
        assert (r.prompt, r.subject, r.target_new, r.target_true) == \
            (e.prompt, e.subject, e.target_new, e.target_true)
        assert r.paraphrase_prompts == e.paraphrase_prompts
        assert (r.neighborhood_prompts, r.neighborhood_answers) == \
            (e.neighborhood_prompts, e.neighborhood_answers)
        assert r.kind == e.kind == "counterfact"
        assert r.generation_prompts == (e.rewrite_prompt(), e.paraphrase_prompts[0])
    first = easy[0]  # the real record, spelled out
    assert first.prompt == "The mother tongue of {} is" and first.subject == "Danielle Darrieux"
    assert first.rewrite_prompt() == "The mother tongue of Danielle Darrieux is"
    assert (first.target_new, first.target_true) == ("English", "French")
    assert first.neighborhood_prompts == ("Michel Rocard is a native speaker of",)
    assert first.neighborhood_answers == ("French",)


def test_data_zsre_record_maps_field_by_field(tmp_path):
    path = FIX / "zsre-mend.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    reqs, skipped = load_requests(path)
    assert len(reqs) == len(raw) == 300 and skipped == []
    for i in (0, 174, 64):                  # (64: five answers, the first the target)
        r, rec = reqs[i], raw[i]
        assert r.case_id == i and r.kind == "zsre"
        assert r.subject == rec["subject"]
        assert r.rewrite_prompt() == rec["src"] and r.prompt.count("{}") == 1
        assert r.target_new == rec["answers"][0] and r.target_true is None     # MEMIT's and the authors' target
        assert r.paraphrase_prompts == (rec["rephrase"],)
        assert r.neighborhood_prompts == (rec["loc"] + "?",)       # as MEMIT scores it (dsets/zsre.py)
        assert r.neighborhood_answers == (rec["loc_ans"],)
        assert r.attribute_prompts == r.generation_prompts == ()
    assert reqs[0].prompt == "What is the product made by {}?"
    assert reqs[174].target_new == "Marvel Universe" and raw[174]["alt"] == " Captain Universe"   # not EasyEdit's alt
    blank_alt = dict(raw[0], alt="")            # records 534 and 723 of zsre_mend_train have one: not read
    assert load_requests(_data_write(tmp_path, [blank_alt]))[0][0].target_new == raw[0]["answers"][0]


def test_data_zsre_neighbourhood_question_ends_in_one_question_mark():
    """question(): MEMIT's loc + "?", but a question that already ends in "?" (trailing spaces
    aside) is left as it is, not given a second one."""
    assert data.question("nq question: who wrote hamlet") == "nq question: who wrote hamlet?"
    assert data.question("who wrote hamlet?") == "who wrote hamlet?"
    assert data.question("who wrote hamlet? ") == "who wrote hamlet? "


def test_data_easyedit_neighbourhood_answer_is_its_own_field(tmp_path):
    """EasyEdit's locality_ground_truth is the neighbourhood prompt's answer, read as written, not
    the edited fact's ground_truth (equal in every record of the bundled fixture)."""
    (r,), _ = load_requests(_data_write(tmp_path, [dict(EASY_REC, locality_ground_truth="Lyon")]))
    assert r.neighborhood_answers == ("Lyon",) and r.target_true == "Paris"


def test_data_rome_layout_fields(tmp_path):
    path = _data_write(tmp_path, [ROME_REC])
    (r,), _ = load_requests(path)
    assert r == Request(7, "The capital of {} is", "France", "Rome", "Paris",
                        ("France has its capital in",), tuple(ROME_REC["neighborhood_prompts"]),
                        ("Paris", "Paris"), ("The capital of Italy is",), ("France's capital city",))
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.subject = "Spain"
    rec = copy.deepcopy(ROME_REC)  # optional fields and ids may be left out
    del rec["attribute_prompts"], rec["generation_prompts"], rec["requested_rewrite"]["target_new"]["id"]
    (r,), _ = load_requests(_data_write(tmp_path, [rec]))
    assert r.attribute_prompts == r.generation_prompts == ()


def test_data_template_uses_first_occurrence_and_case_ids(tmp_path):
    rec = dict(EASY_REC, prompt="Paris of France, France's capital, is", case_id="cf-7")
    with pytest.warns(data.DataWarning, match=r"record 0 \(case_id cf-7\): field 'prompt': subject 'France' "
                      r"occurs 2 times in .*; the first occurrence is edited"):
        (r,), _ = load_requests(_data_write(tmp_path, [rec]))
    assert r.prompt == "Paris of {}, France's capital, is" and r.case_id == "cf-7"
    (z,), _ = load_requests(_data_write(tmp_path, [dict(ZSRE_REC, case_id=42)]))
    assert z.case_id == 42


def _mutated(base, field, value):
    """A copy of ``base`` with dotted ``field`` set to ``value`` (deleted if value is ...)."""
    rec = copy.deepcopy(base)
    *parents, last = field.split(".")
    obj = rec
    for p in parents:
        obj = obj[p]
    if value is ...:
        del obj[last]
    else:
        obj[last] = value
    return rec


RW = "requested_rewrite."
BAD_RECORDS = [  # base, field to change, new value (... = delete), field named, problem named
    (ROME_REC, RW + "subject", ..., RW + "subject", "missing"),
    (ROME_REC, RW + "subject", "", RW + "subject", "empty"),
    (ROME_REC, RW + "prompt", "The capital of France is", RW + "prompt", "exactly one"),
    (ROME_REC, RW + "prompt", "{} and {} are", RW + "prompt", "exactly one"),
    (ROME_REC, RW + "target_new.str", 5, RW + "target_new.str", "expected a string"),
    (ROME_REC, RW + "target_new.str", "  ", RW + "target_new.str", "whitespace"),
    (ROME_REC, RW + "target_new.str", "Paris", RW + "target_new.str", "equals target_true"),
    (ROME_REC, RW + "target_true", "Paris", RW + "target_true", "expected an object"),
    (ROME_REC, "paraphrase_prompts", "France has its capital in", "paraphrase_prompts", "expected a list"),
    (ROME_REC, "paraphrase_prompts", ["ok", 3], "paraphrase_prompts[1]", "expected a string"),
    (ROME_REC, "paraphrase_prompts", ["ok", "Paris \ud800"], "paraphrase_prompts[1]", "not valid text: surrogates"),
    (ROME_REC, "neighborhood_prompts", ..., "neighborhood_prompts", "missing"),
    (ROME_REC, "case_id", 7.5, "case_id", "int or a string"),
    (EASY_REC, "prompt", "The capital of Spain is", "prompt", "'France' does not occur"),
    (dict(EASY_REC, subject="Zu\u0308rich", prompt="The capital of Zu\u0308rich is"), "prompt",
     "The capital of Z\u00fcrich is", "prompt", "differ only in Unicode normalisation"),   # NFC prompt, NFD subject
    (EASY_REC, "subject", "  ", "subject", "empty"),
    (EASY_REC, "target_new", "Paris", "target_new", "equals target_true"),
    (EASY_REC, "target_new", " Paris", "target_new", "equals target_true"),   # (the same ids: target_ids adds the space)
    (ROME_REC, RW + "target_true.str", "Rome ", RW + "target_new.str", "equals target_true"),
    (EASY_REC, "rephrase_prompt", ["a", "b"], "rephrase_prompt", "expected a string"),
    (EASY_REC, "locality_ground_truth", ..., "locality_ground_truth", "missing"),
    (ZSRE_REC, "src", "What is the capital of Spain?", "src", "'France' does not occur"),
    (ZSRE_REC, "answers", ["  "], "answers[0]", "empty"),
    (ZSRE_REC, "answers", [], "answers", "empty list"),
    (ZSRE_REC, "loc_ans", None, "loc_ans", "expected a string"),
    (EASY_REC, "prompt", "The {} capital of France is", "prompt", 'contains "{}" already'),   # (not the Request's)
    (ROME_REC, "paraphrase_prompts", ..., "paraphrase_prompts", "missing"),
    (ROME_REC, "case_id", True, "case_id", "int or a string"),
]


@pytest.mark.parametrize("base,field,value,named,problem", BAD_RECORDS)
def test_data_bad_record_errors_name_file_record_and_field(tmp_path, base, field, value, named, problem):
    good = dict(base, case_id=3) if "case_id" in base else base
    bad = _mutated(base, field, value)
    cid = bad.get("case_id", 1)  # zsRE records without case_id use the index
    path = _data_write(tmp_path, [good, bad])
    _data_error(path, "record 1", f"case_id {cid}", f"field '{named}'", problem)


def test_a_limit_below_one_is_refused(tmp_path):
    """limit 0 or -1 gave no requests, silently (the command refuses --limit 0 itself)."""
    path = _data_write(tmp_path, [EASY_REC])
    assert len(load_requests(path, limit=np.int64(1))[0]) == 1
    for limit in (0, -1, 1.5, True):
        with pytest.raises(DataError, match=rf"^limit {re.escape(repr(limit))}: give a number of requests, at least 1"):
            load_requests(path, limit=limit)


def test_data_missing_case_id_and_duplicates(tmp_path):
    path = _data_write(tmp_path, [EASY_REC, _mutated(EASY_REC, "case_id", ...)])
    _data_error(path, "record 1", "field 'case_id'", "missing")
    other = dict(EASY_REC, subject="Italy", prompt="The capital of Italy is")
    path = _data_write(tmp_path, [EASY_REC, dict(EASY_REC, case_id=8), other])
    _data_error(path, "record 2 (case_id 7)", "field 'case_id'", "duplicate", "record 0")
    path = _data_write(tmp_path, [dict(EASY_REC, case_id=8), EASY_REC, other])   # the first holder named
    _data_error(path, "record 2 (case_id 7)", "duplicate case_id 7: also record 1")
    path = _data_write(tmp_path, [EASY_REC, dict(other, case_id="7")])   # one case to --snippets' keys
    _data_error(path, "record 1 (case_id 7)", "field 'case_id'", "duplicate case_id '7'", "record 0")


@pytest.mark.parametrize("content,parts", [
    ('[{"case_id": 1},\n {oops}]', ["not valid JSON", "line 2", "column 3"]),
    (json.dumps({"case_id": 1}, indent=1), ["non-empty list", "dict"]),
    (json.dumps(EASY_REC, indent=1), ["non-empty list", "one record (put it in a list, or write JSON Lines"]),
    (json.dumps([EASY_REC], indent=1) + "\n]\n", ["not valid JSON", "line 13", "Extra data"]),    # (not as Lines)
    ('{"case_id": 1}\n{"case_id": 2}\n{oops}\n', ["not valid JSON Lines", "line 3", "column 2"]),
    ([], ["non-empty list", "empty list"]),
    ([EASY_REC, 5], ["record 1", "expected an object", "int"]),
    ([EASY_REC, {"question": "q", "answer": "a"}],
     ["record 1", "unknown layout", "'answer'", "'question'",
      "counterfact-rome", "counterfact-easyedit", "zsre-mend"]),
    ([{"question": "q"}], ["no record has a supported layout", "'question'", "zsre-mend"]),
    # a layout is known by all of its identifying keys, not one ("prompt" alone is not EasyEdit's)
    ([EASY_REC, {"prompt": "q", "answer": "a"}], ["record 1", "unknown layout", "'answer'", "'prompt'"]),
])
def test_data_file_level_errors(tmp_path, content, parts):
    _data_error(_data_write(tmp_path, content), *parts)


def test_data_mixed_layouts_and_unreadable_files_always_raise(tmp_path):
    path = _data_write(tmp_path, [EASY_REC, ZSRE_REC])
    _data_error(path, "record 1", "zsre-mend", "counterfact-easyedit", "one layout", skip_bad=True)
    _data_error(tmp_path / "absent.json", "not found", skip_bad=True)
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes('[{"subject": "Café"}]'.encode("latin-1"))
    _data_error(latin1, "UTF-8")


def test_data_skip_bad_reports_and_limit(tmp_path):
    recs = [dict(EASY_REC, case_id=i) for i in range(6)]
    recs[1] = dict(recs[1], target_new="Paris")
    recs[3] = 17
    recs[5] = dict(recs[5], case_id=0)  # duplicate of record 0
    path = _data_write(tmp_path, recs)
    reqs, skipped = load_requests(path, skip_bad=True)
    assert [r.case_id for r in reqs] == [0, 2, 4]
    assert len(skipped) == 3
    assert all(path.name in m for m in skipped)
    assert ["record 1" in skipped[0], "record 3" in skipped[1], "record 5" in skipped[2]] == [True] * 3
    assert [r.case_id for r in load_requests(path, skip_bad=True, limit=2)[0]] == [0, 2]
    reqs, skipped = load_requests(path, skip_bad=True, limit=1)
    assert [r.case_id for r in reqs] == [0] and skipped == []
    reqs, skipped = load_requests(FIX / "counterfact-easyedit.json", limit=5)
    assert [r.case_id for r in reqs] == [0, 1, 4, 5, 6] and skipped == []  # ids of the file
    reqs, skipped = load_requests(_data_write(tmp_path, [17] + recs[:1], "bad-first.json"), skip_bad=True)
    assert [r.case_id for r in reqs] == [0] and "record 0" in skipped[0]    # the layout: the first recognised record's


def test_data_json_lines_byte_order_marks_and_whole_float_ids_load(tmp_path):
    """Files as users have them: JSON Lines (the datasets library's to_json; was "Extra data"), a
    UTF-8 byte-order mark (Notepad, PowerShell; was refused in edits, and kept a corpus's first
    WikiText heading as text), a case id 7.0 (pandas, in a column with a gap; was refused)."""
    plain = FIX / "counterfact-easyedit.json"
    records = json.loads(plain.read_text(encoding="utf-8"))
    lines = tmp_path / "cf.jsonl"
    lines.write_text("\n".join(map(json.dumps, records)) + "\n\n", encoding="utf-8")
    assert load_requests(lines)[0] == load_requests(plain)[0]
    lines.write_text(json.dumps(records[0]) + "\n", encoding="utf-8")        # one record (head -1)
    assert load_requests(lines)[0] == load_requests(plain, limit=1)[0]
    odd = [dict(records[0], target_new=records[0]["target_new"] + "\u2028x"), records[1]]   # a line separator in a text
    lines.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in odd), encoding="utf-8")
    assert [q.target_new for q in load_requests(lines)[0]] == [odd[0]["target_new"], odd[1]["target_new"]]
    recs = [dict(r, case_id=i) for i, r in enumerate(records[:4])]        # messages name the line, as an editor
    recs[2] = dict(recs[2], target_new=recs[2]["ground_truth"])            # shows it (they gave "record 2")
    lines.write_text("\n" + json.dumps(recs[0]) + "\n\n" + "\n".join(map(json.dumps, recs[1:] + [recs[0]])) + "\n",
                     encoding="utf-8")
    _data_error(lines, "line 5, record 2 (case_id 2)", "equals target_true")
    assert load_requests(lines, skip_bad=True)[1][1].endswith("line 7, record 4 (case_id 0): field 'case_id': "
                                                              "duplicate case_id 0: also line 2, record 0")
    lines.write_text("\n\n" + json.dumps(recs[2]) + "\n", encoding="utf-8")     # one record, after blank lines
    _data_error(lines, "line 3, record 0 (case_id 2)", "equals target_true")
    lines.write_text(json.dumps(recs[0])[:-1] + "\n" + json.dumps(recs[1]) + "\n", encoding="utf-8")
    _data_error(lines, "not valid JSON Lines: line 1")             # (was JSON's "line 2, column 1: Expecting ','")
    marked = tmp_path / "bom.json"
    marked.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    assert load_requests(marked)[0] == load_requests(plain)[0]
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes("\ufeff = Title = \r\n\r\n Some text . \r\n".encode("utf-8"))
    assert data.read_corpus(corpus) == ["Some text ."]
    whole = tmp_path / "float-ids.json"
    whole.write_text(json.dumps([dict(r, case_id=float(r["case_id"])) for r in records[:3]]), encoding="utf-8")
    assert load_requests(whole)[0] == load_requests(plain, limit=3)[0]
    assert [type(q.case_id) for q in load_requests(whole)[0]] == [int] * 3


def test_data_gzip_files_load_like_plain_ones(tmp_path):
    import gzip
    plain = FIX / "counterfact-easyedit.json"
    packed = tmp_path / "cf.json.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert load_requests(packed)[0] == load_requests(plain)[0]
    assert load_requests(FIX / "counterfact-edit.json.gz", limit=300)[0] == load_requests(plain)[0]
    packed.write_bytes(gzip.compress(b"\xef\xbb\xbf" + plain.read_bytes()))   # a byte-order mark inside the gzip
    assert load_requests(packed)[0] == load_requests(plain)[0]
    packed.write_bytes(packed.read_bytes()[:500])                       # truncated
    _data_error(packed, str(packed), "cannot read data")
    packed.write_bytes(plain.read_bytes())              # by its bytes, not its name: plain under .gz
    assert load_requests(packed)[0] == load_requests(plain)[0]
    upper = tmp_path / "CF.JSON.GZ"                     # and gzip under another name (was "byte 0x8b")
    upper.write_bytes(gzip.compress(plain.read_bytes()))
    assert load_requests(upper)[0] == load_requests(plain)[0]


def test_data_snippet_keys_are_case_ids_as_text(tmp_path):
    """JSON's keys are text: kept so (case id 7 and "7" are one case where they are looked up; a key
    "007" is not 7, as it was when digits were read as ints)."""
    path = tmp_path / "snippets.json"
    keys = {"7": ["ä text"], "-3": ["b"], "--5": ["c"], "x1": ["d"], "007": ["e"]}
    path.write_text(json.dumps(keys), encoding="utf-8")
    assert data.read_snippets(path) == keys


def test_data_snippets_may_be_gzipped_and_hold_no_empty_reference(tmp_path):
    """As --edits, a gzip-compressed file reads (it was "'utf-8' codec can't decode byte 0x8b"); a
    case with no reference text, or an empty one, is refused (it scored consistency 0)."""
    path = tmp_path / "snippets.json.gz"
    path.write_bytes(gzip.compress(json.dumps({"7": ["a text"]}).encode()))
    assert data.read_snippets(path) == {"7": ["a text"]}
    for bad in ({"7": ["a text"], "8": [" "]}, {"8": []}):
        path.write_text(json.dumps(bad))
        with pytest.raises(DataError, match="case 8's reference texts are none or empty"):
            data.read_snippets(path)
    path.write_text(json.dumps({"": [], "7": ["a text"]}))        # (the case id "": a key that is falsy, was let by)
    with pytest.raises(DataError, match="case 's reference texts are none or empty"):
        data.read_snippets(path)


def test_data_snippets_refuse_what_is_not_an_object_of_lists_of_strings(tmp_path):
    """A case whose reference texts are a bare string (its characters read as texts) or hold a
    number (an AttributeError later), or a top level that is a list, is refused as --snippets'
    shape; a file that is not JSON is a DataError naming it, too."""
    path = tmp_path / "snippets.json"
    for bad in ({"7": "a text"}, {"7": ["a text", 3]}, ["a text"]):
        path.write_text(json.dumps(bad))
        with pytest.raises(DataError, match=r"expected an object \{case_id: \[text, ...\]\}"):
            data.read_snippets(path)
    path.write_text('{"7": ["a text"')
    with pytest.raises(DataError, match=rf"^--snippets {re.escape(str(path))}: Expecting"):
        data.read_snippets(path)


def test_data_read_corpus(tmp_path):
    paragraphs = read_corpus(FIX / "wikitext-2-test-sample.txt")
    assert paragraphs[0].startswith("Robert Boulter is an English film")
    assert all(p and p == p.strip() for p in paragraphs)
    assert not any(p.startswith("= ") and p.endswith(" =") for p in paragraphs)
    assert "= = Career = =" not in paragraphs and len(paragraphs) > 100
    assert any(p.startswith("Du Fu ( Wade") for p in paragraphs)  # a second article's text
    (tmp_path / "eq.txt").write_text("= = Section = =\n= 2 + 2 = 4 , as counted .\n", encoding="utf-8")
    assert read_corpus(tmp_path / "eq.txt") == ["= 2 + 2 = 4 , as counted ."]   # a heading is a whole line
    (tmp_path / "blank.txt").write_text("\n \n = Title = \n\n", encoding="utf-8")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00abc")
    for name, problem in [("absent.txt", "not found"), ("blank.txt", "no text"), ("bin.txt", "UTF-8")]:
        with pytest.raises(DataError, match=problem) as info:
            read_corpus(tmp_path / name)
        assert name in str(info.value)


def test_data_file_sha256_and_stdlib_only(tmp_path):
    path = _data_write(tmp_path, "hello")
    assert file_sha256(path) == hashlib.sha256(b"hello").hexdigest()
    with pytest.raises(DataError, match="absent"):
        file_sha256(tmp_path / "absent")
    with pytest.raises(DataError, match="cannot read"):
        file_sha256(tmp_path)                                   # a directory: a DataError, not a traceback
    path.write_bytes(b"a" * (1 << 20) + b"b")                   # past the first 1 MiB block
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    tree = ast.parse((Path(__file__).parent / "data.py").read_text(encoding="utf-8"))
    modules = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    modules |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert modules <= set(sys.stdlib_module_names), modules


def test_data_read_jsonl_reads_only_and_trim_jsonl_rewrites(tmp_path):
    path = tmp_path / "log.jsonl"
    text = '{"step": 0}\n{"step": 1}\n[1]\n{"step": 3}\n{"step": 4, "torn'
    path.write_text(text)
    assert data.read_jsonl(path) == ([{"step": 0}, {"step": 1}], 3)   # stops at the non-object
    assert path.read_text() == text                                    # reading leaves the file
    assert data.read_jsonl(tmp_path / "absent.jsonl") == ([], 0)
    assert data.trim_jsonl(path, lambda e: e["step"] < 1) == [{"step": 0}]
    assert path.read_text() == '{"step": 0}\n'
    path.write_bytes(b'{"step": 0}\n{"step": 1, "note": "\xc3\n{"step": 2}\n')   # torn inside a character
    assert data.read_jsonl(path) == ([{"step": 0}], 2)                    # nothing after a torn line is read


def test_data_append_jsonl_adds_one_line_after_those_there(tmp_path):
    path = tmp_path / "log.jsonl"
    data.write_jsonl(path, [{"step": 0}])
    data.append_jsonl(path, {"step": 1})
    data.append_jsonl(path, {"step": 2})
    assert data.read_jsonl(path) == ([{"step": 0}, {"step": 1}, {"step": 2}], 0)


def test_data_requests_from_records_in_memory_is_load_requests(tmp_path):
    records = [ROME_REC, {**ROME_REC, "case_id": 8}]
    assert data.requests_from(records) == load_requests(_data_write(tmp_path, records))
    with pytest.raises(DataError, match=r"^my list: record 1 \(case_id 7\): field 'case_id': duplicate"):
        data.requests_from([ROME_REC, ROME_REC], "my list")


def test_a_request_built_by_hand_is_checked_as_a_loaded_one():
    """dataclasses.replace(q, target_new="") edited towards a bare space; answers fewer than the
    neighbourhood prompts were an IndexError in the scoring; a number as target an AttributeError."""
    q = data.load_requests(FIX / "counterfact-rome.json", limit=1)[0][0]
    for change, message in ((dict(target_new=""), "field 'target_new': expected a non-empty string"),
                            (dict(target_new=5), "field 'target_new': expected a non-empty string, got 5"),
                            (dict(prompt="no subject"), "field 'prompt': needs exactly one"),
                            (dict(target_new="  "), "field 'target_new': expected a non-empty string"),
                            (dict(subject=""), "field 'subject': expected a non-empty string"),
                            (dict(prompt="{} and {}"), "field 'prompt': needs exactly one"),
                            (dict(target_true=5), "field 'target_true': expected a string or None"),
                            (dict(neighborhood_answers=()), "field 'neighborhood_answers': 0 answers for 1 "),
                            (dict(neighborhood_answers=("a", "b")), "field 'neighborhood_answers': 2 answers for 1 "),
                            (dict(paraphrase_prompts=["a {}"]), "field 'paraphrase_prompts': expected a tuple"),
                            (dict(paraphrase_prompts=("a", 3)), "field 'paraphrase_prompts': expected a tuple of strings"),
                            (dict(generation_prompts=["a"]), "field 'generation_prompts': expected a tuple"),
                            (dict(kind="other"), "field 'kind': 'counterfact' or 'zsre'")):
        with pytest.raises(data.DataError, match=f"Request {q.case_id!r}: {message}"):
            dataclasses.replace(q, **change)


def test_every_bundled_file_has_its_sha256_in_sources():
    """fixtures/SOURCES.md lists every file under fixtures/ with its sha256, once, and each holds:
    a retrained fact model, a rebuilt oracle or an edited fixture must update its provenance."""
    rows = {}
    for line in (FIX / "SOURCES.md").read_text().splitlines():
        if m := re.match(r"^\| ([\w./-]+) \|.*\b([0-9a-f]{64})\b", line):
            assert m[1] not in rows, m[1]
            rows[m[1]] = m[2]
    files = {p.relative_to(FIX).as_posix() for p in FIX.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert set(rows) == files - {"SOURCES.md"}
    for path, digest in rows.items():
        assert hashlib.sha256((FIX / path).read_bytes()).hexdigest() == digest, path


def test_write_atomic_leaves_the_old_file_whole_when_the_write_fails(tmp_path, monkeypatch):
    """A run's latest.json and config.json are written whole or not at all: a write that fails (a
    full disk, at the flush) leaves the file before it as it was."""
    path = tmp_path / "latest.json"
    data.write_atomic(path, '{"checkpoint": "ckpt-000001", "step": 1}')
    monkeypatch.setattr(data.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OSError, match="No space left"):
        data.write_atomic(path, '{"checkpoint": "ckpt-000002", "step": 2}')
    assert json.loads(path.read_text()) == {"checkpoint": "ckpt-000001", "step": 1}


def test_write_atomic_and_sync_files_reach_the_disk_in_order(tmp_path, monkeypatch):
    """write_atomic fsyncs the temporary file with all its text (flushed first), renames it, then
    fsyncs the directory (so the rename survives a power loss); sync_files fsyncs each file, then
    the directory."""
    synced, real = [], os.fsync

    def fsync(fd):
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        synced.append(("dir", sorted(os.listdir(path))) if path.is_dir() else (path.name, os.fstat(fd).st_size))
        return real(fd)
    monkeypatch.setattr(data.os, "fsync", fsync)
    data.write_atomic(tmp_path / "latest.json", '{"step": 1}')
    assert synced == [("latest.json.tmp", 11), ("dir", ["latest.json"])]
    (tmp_path / "log.jsonl").write_text("{}\n")
    synced.clear()
    data.sync_files(tmp_path)
    assert sorted(synced[:2]) == [("latest.json", 11), ("log.jsonl", 3)]
    assert synced[2:] == [("dir", ["latest.json", "log.jsonl"])]


def test_a_second_sigterm_while_the_first_unwinds_is_ignored():
    """exit_on_sigterm leaves through Python's shutdown, its cleanup (a temporary file removed, a
    checkpoint's partial directory) safe from a second SIGTERM: ignored from the first on."""
    import signal
    with data.sigterm_exits():
        with pytest.raises(data.Terminated) as stop:
            os.kill(os.getpid(), signal.SIGTERM)
        assert stop.value.code == 128 + signal.SIGTERM and signal.getsignal(signal.SIGTERM) is signal.SIG_IGN


def test_sigterm_exits_leaves_an_ignored_sigterm_ignored():
    """A SIGTERM the process ignores (its parent's choice, or exit_on_sigterm's cleanup under way)
    stays ignored inside sigterm_exits, and after it."""
    import signal
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with data.sigterm_exits():
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_sigterm_exits_gives_back_the_handler_set_before_it():
    import signal
    handler = lambda signum, frame: None
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        with data.sigterm_exits():
            assert signal.getsignal(signal.SIGTERM) is data.exit_on_sigterm
        assert signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGTERM, previous)
