"""Editing datasets (CounterFact, zsRE) loaded into one typed, validated record.

A file holds a JSON list of records or JSON Lines (one record a line; gzip-compressed or not).
Layouts, detected from the records themselves (not the file name):

* ``counterfact-rome``: ROME/MEMIT ``counterfact.json`` (``requested_rewrite`` ...).
* ``counterfact-easyedit``: EasyEdit ``counterfact-{edit,train,val}.json``.
* ``zsre-mend``: MEND ``zsre_mend_*.json`` (``src``, ``answers``, ``loc`` ...), each question
  edited to its answer ``answers[0]`` as MEMIT's and the LyapLock authors' ``dsets/zsre.py`` do
  (EasyEdit edits to ``alt`` instead; this loader does not read it).

Everything is checked before any model work; each problem is a ``DataError``
naming the file, the record (index and case id) and the field. Also the run files'
helpers (atomic writes, JSON lines, consistency snippets). Standard library only.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import signal
import threading
import unicodedata
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


class DataError(ValueError):
    """A data file or record that cannot be used."""


class DataWarning(UserWarning):
    """A record that is used, but with a choice the user should know about."""


@dataclass(frozen=True)
class Request:
    """One edit: make the model complete ``prompt`` (with ``subject``) as ``target_new``."""

    case_id: int | str
    prompt: str  # template with exactly one "{}" where the subject goes
    subject: str
    target_new: str  # as written in the data; the method adds the leading space
    target_true: str | None  # None where the layout has none
    paraphrase_prompts: tuple[str, ...]
    neighborhood_prompts: tuple[str, ...]
    neighborhood_answers: tuple[str, ...]  # one per neighborhood prompt
    attribute_prompts: tuple[str, ...] = ()
    generation_prompts: tuple[str, ...] = ()
    kind: str = "counterfact"  # "counterfact" | "zsre"

    def __post_init__(self):
        """A Request built by hand (or by dataclasses.replace) meets what the loaders check: a
        DataError naming the field, not a wrong edit (an empty target edits towards a space) or an
        IndexError in the scoring."""
        def bad(field, problem):
            raise DataError(f"Request {self.case_id!r}: field '{field}': {problem}")
        for field in ("prompt", "subject", "target_new"):
            value = getattr(self, field)
            if not isinstance(value, str) or not value.strip():
                bad(field, f"expected a non-empty string, got {value!r:.60}")
        if self.prompt.count("{}") != 1:
            bad("prompt", f'needs exactly one "{{}}" where the subject goes, got {self.prompt!r:.60}')
        if self.target_true is not None and not isinstance(self.target_true, str):
            bad("target_true", f"expected a string or None, got {self.target_true!r:.60}")
        for field in ("paraphrase_prompts", "neighborhood_prompts", "neighborhood_answers", "attribute_prompts",
                      "generation_prompts"):
            value = getattr(self, field)
            if not isinstance(value, tuple) or not all(isinstance(t, str) for t in value):
                bad(field, f"expected a tuple of strings, got {value!r:.60}")
        if len(self.neighborhood_answers) != len(self.neighborhood_prompts):
            bad("neighborhood_answers", f"{len(self.neighborhood_answers)} answers for "
                                        f"{len(self.neighborhood_prompts)} neighborhood prompts: give one each")
        if self.kind not in ("counterfact", "zsre"):
            bad("kind", f"'counterfact' or 'zsre', got {self.kind!r}")

    def rewrite_prompt(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.replace("{}", self.subject, 1)


# layout -> (keys that identify it, its required keys, for messages)
LAYOUTS = {
    "counterfact-rome": ({"requested_rewrite"},
                         "case_id, requested_rewrite, paraphrase_prompts, neighborhood_prompts"),
    "counterfact-easyedit": ({"prompt", "ground_truth"},
                             "case_id, prompt, subject, target_new, ground_truth, rephrase_prompt, "
                             "locality_prompt, locality_ground_truth"),
    "zsre-mend": ({"src", "answers"}, "subject, src, rephrase, answers, loc, loc_ans"),
}
_SUPPORTED = "; ".join(f"{name} ({keys})" for name, (_, keys) in LAYOUTS.items())


def _layout_of(rec) -> str | None:
    """The layout whose identifying keys the record has, or None."""
    if isinstance(rec, dict):
        for name, (keys, _) in LAYOUTS.items():
            if keys <= rec.keys():
                return name
    return None


class _Where:
    """A record's place (file, "record i" or "line n, record i", case id): builds errors and reads
    checked fields."""

    def __init__(self, file, place: str, case_id=None):
        self.file, self.place, self.case_id = file, place, case_id

    def error(self, field: str | None, problem: str) -> DataError:
        at = self.place + ("" if self.case_id is None else f" (case_id {self.case_id})")
        return DataError(f"{self.file}: {at}: " + (f"field '{field}': " if field else "") + problem)

    def get(self, obj: dict, key: str, field: str, kind: type = str):
        """``obj[key]``: present, of type ``kind``, and not blank if a string."""
        if key not in obj:
            raise self.error(field, "missing")
        value = obj[key]
        if not isinstance(value, kind):
            want = {str: "a string", dict: "an object", list: "a list"}[kind]
            raise self.error(field, f"expected {want}, got {type(value).__name__} {value!r:.60}")
        if kind is str and not value.strip():
            raise self.error(field, f"empty or whitespace-only string {value!r}")
        if kind is str and not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:             # JSON's "\ud800": no text a tokenizer takes
                raise self.error(field, f"not valid text: {e.reason} at character {e.start} of {value!r:.60}") from None
        return value

    def strs(self, obj: dict, key: str, field: str, optional: bool = False) -> tuple[str, ...]:
        """``obj[key]`` as a tuple of non-blank strings (``()`` if absent and ``optional``)."""
        if optional and key not in obj:
            return ()
        items = self.get(obj, key, field, list)
        return tuple(self.get({i: s}, i, f"{field}[{i}]") for i, s in enumerate(items))

    def differ(self, new: str, true: str, field: str):
        """A CounterFact edit changes something: its new target is not its true one."""
        if new.strip() == true.strip():
            raise self.error(field, f"target_new equals target_true ({new!r})")

    def template(self, obj: dict, key: str, subject: str) -> str:
        """A filled prompt made a template: the FIRST occurrence of the subject becomes "{}"."""
        text = self.get(obj, key, key)
        if "{}" in text:
            raise self.error(key, f'contains "{{}}" already: {text!r}')
        if subject not in text:
            nfc = lambda t: unicodedata.normalize("NFC", t)
            hint = ("; they differ only in Unicode normalisation (composed and decomposed accents): write both in one "
                    "form, e.g. NFC") if nfc(subject) in nfc(text) else ""
            raise self.error(key, f"subject {subject!r} does not occur in prompt {text!r}{hint}")
        if text.count(subject) > 1:
            warnings.warn(str(self.error(key, f"subject {subject!r} occurs {text.count(subject)} times in "
                                              f"{text!r}; the first occurrence is edited")), DataWarning)
        return text.replace(subject, "{}", 1)


def _from_rome(w: _Where, rec: dict) -> Request:
    rw = w.get(rec, "requested_rewrite", "requested_rewrite", dict)
    prompt = w.get(rw, "prompt", "requested_rewrite.prompt")
    if prompt.count("{}") != 1:
        raise w.error("requested_rewrite.prompt", f'needs exactly one "{{}}", got {prompt!r}')
    new = w.get(w.get(rw, "target_new", "requested_rewrite.target_new", dict), "str", "requested_rewrite.target_new.str")
    true = w.get(w.get(rw, "target_true", "requested_rewrite.target_true", dict), "str",
                 "requested_rewrite.target_true.str")
    w.differ(new, true, "requested_rewrite.target_new.str")
    neighbors = w.strs(rec, "neighborhood_prompts", "neighborhood_prompts")
    return Request(
        case_id=w.case_id, prompt=prompt,
        subject=w.get(rw, "subject", "requested_rewrite.subject"),
        target_new=new, target_true=true,
        paraphrase_prompts=w.strs(rec, "paraphrase_prompts", "paraphrase_prompts"),
        neighborhood_prompts=neighbors,
        neighborhood_answers=(true,) * len(neighbors),  # ROME: neighbours keep target_true
        attribute_prompts=w.strs(rec, "attribute_prompts", "attribute_prompts", optional=True),
        generation_prompts=w.strs(rec, "generation_prompts", "generation_prompts", optional=True),
    )


def _from_easyedit(w: _Where, rec: dict) -> Request:
    subject = w.get(rec, "subject", "subject")
    new, true = w.get(rec, "target_new", "target_new"), w.get(rec, "ground_truth", "ground_truth")
    w.differ(new, true, "target_new")
    return Request(
        case_id=w.case_id, prompt=w.template(rec, "prompt", subject), subject=subject,
        target_new=new, target_true=true,
        paraphrase_prompts=(w.get(rec, "rephrase_prompt", "rephrase_prompt"),),
        neighborhood_prompts=(w.get(rec, "locality_prompt", "locality_prompt"),),
        neighborhood_answers=(w.get(rec, "locality_ground_truth", "locality_ground_truth"),),
    )


def _from_zsre(w: _Where, rec: dict) -> Request:
    subject = w.get(rec, "subject", "subject")
    answers = w.strs(rec, "answers", "answers")
    if not answers:
        raise w.error("answers", "empty list")
    return Request(                   # the target: answers[0] (MEMIT's and the authors' dsets/zsre.py)
        case_id=w.case_id, prompt=w.template(rec, "src", subject), subject=subject,
        target_new=answers[0], target_true=None,
        paraphrase_prompts=(w.get(rec, "rephrase", "rephrase"),),
        neighborhood_prompts=(question(w.get(rec, "loc", "loc")),),
        neighborhood_answers=(w.get(rec, "loc_ans", "loc_ans"),),
        kind="zsre",
    )


def question(loc: str) -> str:
    """zsRE's neighbourhood prompt as MEMIT builds it (dsets/zsre.py: record["loc"] + "?"): the
    Natural Questions question ends in "?" before its answer is scored (one that already ends in
    "?" is left as it is, where MEMIT's would end in "??"; no MEND record does)."""
    return loc if loc.rstrip().endswith("?") else loc + "?"


_READERS = {"counterfact-rome": _from_rome, "counterfact-easyedit": _from_easyedit,
            "zsre-mend": _from_zsre}


def _read_record(path, i: int, rec, layout: str, seen: dict, place: str) -> Request:
    """Turn record ``i`` (of the file's ``layout``, at ``place``) into a checked Request."""
    if not isinstance(rec, dict):
        raise _Where(path, place).error(None, f"expected an object, got {type(rec).__name__}")
    cid = rec.get("case_id", i if layout == "zsre-mend" else None)  # zsRE has no ids: use the index
    w = _Where(path, place, cid)
    if _layout_of(rec) is None:
        raise w.error(None, f"unknown layout: found keys {sorted(rec)}; supported layouts: {_SUPPORTED}")
    if cid is None:
        raise w.error("case_id", "missing")
    if isinstance(cid, float) and cid.is_integer():     # pandas writes 7.0 in a column with a gap
        cid = w.case_id = int(cid)
    if isinstance(cid, bool) or not isinstance(cid, (int, str)):
        raise w.error("case_id", f"expected an int or a string, got {cid!r:.60}")
    req = _READERS[layout](w, rec)
    if str(cid) in seen:          # (7 and "7": one case to --snippets, whose keys are text)
        raise w.error("case_id", f"duplicate case_id {cid!r}: also {seen[str(cid)]}")
    return req


def read_text(path: Path, what: str) -> str:
    """A file's UTF-8 text (gzip-compressed if it starts with gzip's magic bytes, whatever its
    name; a byte-order mark, as Notepad and PowerShell write, dropped); any failure is a DataError
    naming the file."""
    try:
        with open(path, "rb") as f:
            compressed = f.read(2) == b"\x1f\x8b"
        if compressed:
            with gzip.open(path, "rt", encoding="utf-8-sig") as f:
                return f.read()
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{path}: {what} file not found") from None
    except (OSError, UnicodeDecodeError, EOFError) as e:          # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot read {what} as UTF-8 text: {e}") from None


def load_requests(path, skip_bad: bool = False, limit: int | None = None
                  ) -> tuple[list[Request], list[str]]:
    """Load and validate an editing dataset (any supported layout).

    Returns ``(requests, skipped)``. Without ``skip_bad`` the first bad record
    raises and ``skipped`` is empty; with it, bad records are left out and
    ``skipped`` has one message per record. File-level problems (unreadable, not
    JSON, not a non-empty list, mixed layouts) always raise. ``limit`` stops
    after that many good requests; later records are read (the file is parsed
    whole) but not validated. Messages name a JSON Lines record's line too.
    """
    if limit is not None and (isinstance(limit, bool) or not hasattr(limit, "__index__") or limit < 1):
        raise DataError(f"limit {limit!r}: give a number of requests, at least 1 (None: all)")
    path = Path(path)
    records, lines = read_records(path)
    return requests_from(records, path, skip_bad, limit, lines)


def read_records(path: Path) -> tuple[object, list[int] | None]:
    """A JSON file's value, or a JSON Lines file's records as a list (one value a line, as the
    `datasets` library's to_json writes) with each one's line number (None for JSON); a
    DataError names the line that is not JSON."""
    text = read_text(path, "data")
    numbered = [(n, line) for n, line in enumerate(text.split("\n"), 1) if line.strip()]   # (not splitlines:
    def an_object(line):                                                      # U+2028 may stand in a string)
        try:
            return isinstance(json.loads(line), dict)
        except json.JSONDecodeError:
            return False
    try:
        value = json.loads(text)
        return ([value], [numbered[0][0]]) if isinstance(value, dict) and len(numbered) == 1 else (value, None)
    except json.JSONDecodeError as e:   # JSON Lines: objects, "Extra data" after the first, or lines whole
        if not text.lstrip().startswith("{") or (e.msg != "Extra data" and not any(an_object(line) for _, line
                                                                                   in numbered[:2])):
            raise DataError(f"{path}: not valid JSON: line {e.lineno}, column {e.colno}: {e.msg}") from None
    records = []
    for number, line in numbered:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON Lines: line {number}, column {e.colno}: {e.msg}") from None
    return records, [n for n, _ in numbered]


def requests_from(records, source="records", skip_bad: bool = False, limit: int | None = None,
                  lines: list[int] | None = None) -> tuple[list[Request], list[str]]:
    """load_requests on records already in memory (a list of dicts in one supported layout);
    messages name ``source`` where they would name the file (and record i's line, lines[i])."""
    if not isinstance(records, list) or not records:
        got = ("an empty list" if records == [] else "one record (put it in a list, or write JSON Lines: one a line)"
               if _layout_of(records) else type(records).__name__)
        raise DataError(f"{source}: top level must be a non-empty list of records, got {got}")
    layout = next(filter(None, map(_layout_of, records)), None)  # the first recognised record's
    if layout is None:
        first = sorted(records[0]) if isinstance(records[0], dict) else type(records[0]).__name__
        raise DataError(f"{source}: no record has a supported layout (record 0: {first}); "
                        f"supported layouts: {_SUPPORTED}")
    place = (lambda i: f"record {i}") if lines is None else (lambda i: f"line {lines[i]}, record {i}")
    requests, skipped, seen = [], [], {}  # seen: str(case_id) -> the record's place
    for i, rec in enumerate(records):
        if limit is not None and len(requests) >= limit:
            break
        if _layout_of(rec) not in (None, layout):
            raise DataError(f"{source}: {place(i)}: has the {_layout_of(rec)} layout but earlier "
                            f"records have {layout}; a file must use one layout")
        try:
            req = _read_record(source, i, rec, layout, seen, place(i))
        except DataError as e:
            if not skip_bad:
                raise
            skipped.append(str(e))
            continue
        seen[str(req.case_id)] = place(i)
        requests.append(req)
    return requests, skipped


_HEADING = re.compile(r"(= )+.+?( =)+")  # WikiText headings: "= Title =", "= = Section = =" ...


def read_corpus(path) -> list[str]:
    """A plain-text corpus as paragraphs: the non-empty stripped lines, WikiText headings dropped."""
    path = Path(path)
    lines = (line.strip() for line in read_text(path, "corpus").splitlines())
    paragraphs = [s for s in lines if s and not _HEADING.fullmatch(s)]
    if not paragraphs:
        raise DataError(f"{path}: corpus has no text")
    return paragraphs


def file_sha256(path) -> str:
    """Hex sha256 of a file's bytes (to key caches)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e}") from None
    return digest.hexdigest()


# ------------------------------------------------------------------ run files
def write_atomic(path: Path, text: str):
    """Write a whole file or nothing: a temporary file, flushed to the disk, then an atomic rename
    (and the directory flushed, so the rename survives a power loss, not only a killed process)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    sync_directory(path.parent)


def sync_files(directory: Path):
    """Flush every file of a directory, then the directory itself, to the disk."""
    for file in Path(directory).iterdir():
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    sync_directory(Path(directory))


def sync_directory(path: Path):
    """Flush a directory's entries (a rename, a new file) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path: Path) -> tuple[list[dict], int]:
    """The JSON objects of a JSON-lines file up to the first unreadable line (a run killed while
    writing leaves a torn last line), and how many lines that leaves out. Reads only."""
    if not path.exists():
        return [], 0
    lines, entries = path.read_bytes().splitlines(), []
    for line in lines:
        try:
            entry = json.loads(line.decode("utf-8"))
        except ValueError:                    # not JSON, or torn inside a character (not UTF-8)
            break
        if not isinstance(entry, dict):
            break
        entries.append(entry)
    return entries, len(lines) - len(entries)


def trim_jsonl(path: Path, keep) -> list[dict]:
    """Rewrite a JSON-lines file to hold just the readable entries that `keep` accepts; returns them."""
    entries = [e for e in read_jsonl(path)[0] if keep(e)]
    write_jsonl(path, entries)
    return entries


def write_jsonl(path: Path, entries):
    write_atomic(path, "".join(json.dumps(e) + "\n" for e in entries))


def append_jsonl(path: Path, entry: dict):
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")


def read_snippets(path) -> dict:
    """{case_id: [reference text, ...]} for consistency; the keys text, as JSON's are (case id 7
    and "7" are one case: eval.generation_eval)."""
    try:
        raw = json.loads(read_text(Path(path), "snippets"))          # (gzip-compressed too, as --edits)
    except json.JSONDecodeError as e:
        raise DataError(f"--snippets {path}: {e}") from None
    if not isinstance(raw, dict) or not all(isinstance(v, list) and all(isinstance(t, str) for t in v)
                                            for v in raw.values()):
        raise DataError(f"--snippets {path}: expected an object {{case_id: [text, ...]}}")
    if (empty := next((k for k, v in raw.items() if not v or not all(t.strip() for t in v)), None)) is not None:
        raise DataError(f"--snippets {path}: case {empty}'s reference texts are none or empty (consistency "
                        "compares the generations with them)")
    return raw


def refuse_empty_paths(args, kinds: dict):
    """A path flag given as '' would be the working directory (or, for --resume, not given): a
    ValueError naming the flag and what it takes (`kinds`: flag name → "file", "directory", ...)."""
    for name, kind in kinds.items():
        if getattr(args, name) == "":
            raise ValueError(f"--{name.replace('_', '-')} '': give a {kind}")


@contextmanager
def sigterm_exits():
    """For the block, SIGTERM leaves through Python's shutdown (exit_on_sigterm), then the
    handler before is back. Nothing changes where exit_on_sigterm is already the handler (a
    command within a command) or outside the main thread (which cannot set handlers)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) in (exit_on_sigterm, signal.SIG_IGN):
        yield
        return
    previous = signal.signal(signal.SIGTERM, exit_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def exit_on_sigterm(signum, frame):
    """A SIGTERM handler: SIGTERM (what `timeout` and `kill` send) would end the process at once,
    leaving its temporary files (bench.py's random checkpoint, 16 GB for llama3-8b; a fact model
    in training); leave through Python's normal shutdown instead, so `with` blocks and `finally`
    clean up (Terminated, a SystemExit). A second SIGTERM is ignored meanwhile."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated(128 + signum)


class Terminated(SystemExit):
    """SIGTERM (exit_on_sigterm): a SystemExit a command may catch to say where it stopped; `hint`,
    where set, says how to go on."""
    hint = None
