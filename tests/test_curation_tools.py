"""tools/dedup_corpus.py, filter_corpus.py and decontaminate.py run as a user runs them (subprocess, real
files): planted exact and near duplicates found and the first kept, planted low-quality documents removed
by the rule meant to catch them, a planted LAMBADA passage cut out, clean text kept byte for byte; the
bad-input rules of preprocess_data.py; one and two workers, .gz in and out."""
import gzip
import json
import os
import random
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = {name: os.path.join(ROOT, "tools", f"{name}.py") for name in ("dedup_corpus", "filter_corpus",
                                                                        "decontaminate")}
STOP_WORDS = ("the", "to", "of", "and", "that", "with")
VOCAB = ("the of and to in a is that it was he for on are as with his they at be this from have or by one had "
         "not but what all were when we there can an your which their said if do will each about how up out them "
         "then she many some so these would other into has more her two like him see time could no make than "
         "first been its who now people my made over did down only way find use may water long little very "
         "after words called just where most know get through back much before go good new write our used me "
         "man too any day same right look think also around another came come work three word must because "
         "does part even place well such here take why things help put years different away again off went "
         "old number great tell men say small every found still between name should home big give air line "
         "set own under read last never us left end along while might next sound below saw something thought "
         "both few those always looked show large often together asked house world going want school important "
         "until form food keep children feet land side without boy once animals life enough took sometimes "
         "four head above kind began almost live page got earth need far hand high year mother light parts "
         "country father let night following picture being study second eyes soon times story boys since white "
         "days ever paper hard near sentence better best across during today others sure means knew try told "
         "young miles sun ways thing whole hear example heard several change answer room sea against top turned "
         "learn point city play toward five using himself usually").split()


def run_tool(name, *args, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, TOOLS[name], *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def prose(rng, words):
    """Sentences of random common words: every document distinct, and clean by Gopher's rules."""
    out, line = [], []
    for i in range(words):
        line.append(rng.choice(VOCAB) if rng.random() > 0.15 else rng.choice(STOP_WORDS))  # as in real prose
        if len(line) >= rng.randint(8, 16):
            out.append(" ".join(line).capitalize() + ".")
            line = []
    return "\n".join(out + [" ".join(line)]) if line else "\n".join(out)


def write_jsonl(path, texts, extra=True):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"text": t, "id": i} if extra else {"text": t}, ensure_ascii=False) + "\n")


def read_lines(path):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_dedup_finds_planted_exact_and_near_duplicates(tmp_path):
    rng = random.Random(0)
    texts = [prose(rng, 200) for _ in range(60)]
    words = texts[5].split(" ")
    near = " ".join(w if i % 100 != 50 else "zebra" for i, w in enumerate(words))  # 2 of ~200 words changed
    planted = {60: ("exact", 3, "  " + texts[3].upper().replace(" ", "   ") + "\n"), 61: ("near", 5, near)}
    texts += [planted[60][2], planted[61][2], texts[7]]  # reformatted copy, near copy, plain copy
    src = tmp_path / "in.jsonl.gz"
    write_jsonl(src, texts)
    outputs = {}
    for workers in (1, 2):
        out = tmp_path / f"out{workers}.jsonl.gz"
        proc = run_tool("dedup_corpus", "--input", src, "--output", out, "--workers", workers, "--log-interval", 20)
        assert "docs/s" in proc.stderr and "ETA" in proc.stderr
        outputs[workers] = read_lines(out)
    assert outputs[1] == outputs[2]
    assert [d["id"] for d in outputs[1]] == list(range(60))  # the first of each cluster, other keys kept
    report = json.load(open(tmp_path / "out2.report.json"))
    assert (report["documents"], report["kept"], report["exact_duplicates"], report["near_duplicates"]) == (63, 60, 2, 1)
    clusters = {c["kept_line"]: c for c in report["cluster_list"]}
    assert set(clusters) == {4, 6, 8}  # 1-based lines of texts 3, 5, 7
    near_hit = clusters[6]["removed"][0]
    assert near_hit["line"] == 62 and near_hit["kind"] == "near" and 0.8 <= near_hit["similarity"] < 1
    assert clusters[4]["removed"][0]["kind"] == "exact" and clusters[8]["removed"][0]["line"] == 63
    # the near copy survives a threshold above its similarity
    run_tool("dedup_corpus", "--input", src, "--output", tmp_path / "strict.jsonl", "--threshold", 0.99)
    assert len(read_lines(tmp_path / "strict.jsonl")) == 61


def test_filter_removes_each_planted_document_by_its_rule(tmp_path):
    rng = random.Random(1)
    clean = [prose(rng, rng.randint(80, 400)) for _ in range(30)]
    planted = {
        "min_words": prose(rng, 30),
        "max_symbol_word_ratio": " ".join(f"#tag{i} #more" for i in range(60)) + " the and of",
        "max_bullet_lines": "\n".join(f"- {prose(rng, 12).replace(chr(10), ' ')}" for _ in range(12)),
        "max_ellipsis_lines": "\n".join(prose(rng, 12).replace("\n", " ") + "..." for _ in range(10)),
        "max_duplicate_lines": "\n".join([prose(rng, 12)] * 4 + [prose(rng, 12) for _ in range(3)]),
        "min_stop_words": " ".join(rng.choice(["apple", "river", "stone", "cloud", "music"]) + str(i)
                                   for i in range(80)),
        "max_mean_word_length": " ".join("internationalisation" for _ in range(30)) + " " + prose(rng, 30),
    }
    texts = clean + list(planted.values())
    src = tmp_path / "in.jsonl"
    write_jsonl(src, texts)
    proc = run_tool("filter_corpus", "--input", src, "--output", tmp_path / "out.jsonl", "--workers", 2)
    assert "removed by rule" in proc.stdout
    kept = read_lines(tmp_path / "out.jsonl")
    assert [d["text"] for d in kept] == clean
    report = json.load(open(tmp_path / "out.report.json"))
    assert report["removed"] == len(planted)
    for line, rule in enumerate(planted, start=len(clean) + 1):
        assert report["failing_per_rule"][rule] >= 1, rule
    removed_lines = {e["line"]: e["failed"] for rule in report["examples"] for e in report["examples"][rule]}
    for line, rule in enumerate(planted, start=len(clean) + 1):
        assert rule in removed_lines[line], (rule, removed_lines[line])
    # a rule switched off lets its document through
    run_tool("filter_corpus", "--input", src, "--output", tmp_path / "loose.jsonl", "--min-words", "none")
    assert planted["min_words"] in [d["text"] for d in read_lines(tmp_path / "loose.jsonl")]


def test_decontaminate_cuts_out_a_planted_lambada_passage(tmp_path, shared_data):
    lambada = os.path.join(shared_data, "lambada", "lambada_test.jsonl")
    with open(lambada, encoding="utf-8") as f:
        passages = [json.loads(next(f))["text"] for _ in range(50)]
    with open(os.path.join(shared_data, "tinyshakespeare", "input.jsonl"), encoding="utf-8") as f:
        plays = [json.loads(next(f))["text"] for _ in range(20)]
    passage = passages[17].replace("\n", " ")
    host = plays[2]
    middle = len(host) // 2
    texts = plays[:2] + [host[:middle] + "\n" + passage + "\n" + host[middle:], passage] + plays[3:]
    src = tmp_path / "train.jsonl"
    write_jsonl(src, texts)
    evals = [lambada, os.path.join(shared_data, "wikitext-2", "test.jsonl")]
    proc = run_tool("decontaminate", "--input", src, "--output", tmp_path / "clean.jsonl", "--eval-files", *evals,
                    "--workers", 2)
    assert "touched=2" in proc.stdout
    out = [d["text"] for d in read_lines(tmp_path / "clean.jsonl")]
    assert plays[:2] + plays[3:] == [t for t in out if t in plays]  # clean text kept as it was
    pieces = [t for t in out if t not in plays]
    assert len(pieces) == 2 and host.startswith(pieces[0]) and host.endswith(pieces[1])
    assert all(passage[:60] not in t and passage[-60:] not in t for t in out)
    report = json.load(open(tmp_path / "clean.report.json"))
    assert (report["touched"], report["removed"], report["split"]) == (2, 1, 1)
    assert report["per_eval_file"][lambada]["documents_touched"] == 2 and report["distinct_ngrams_hit"] > 10
    assert report["per_eval_file"][evals[1]]["documents_touched"] == 0
    run_tool("decontaminate", "--input", src, "--output", tmp_path / "drop.jsonl", "--eval-files", lambada,
             "--mode", "remove")
    assert [d["text"] for d in read_lines(tmp_path / "drop.jsonl")] == plays[:2] + plays[3:]


@pytest.mark.parametrize("name", list(TOOLS))
def test_bad_input_rules(tmp_path, name):
    rng = random.Random(2)
    src = tmp_path / "in.jsonl"
    good = [json.dumps({"text": prose(rng, 100)}) for _ in range(3)]
    src.write_text("\n".join([good[0], "{not json", json.dumps({"body": "x"}), good[1], good[2]]) + "\n")
    evals = tmp_path / "eval.jsonl"
    evals.write_text(good[0] + "\n")
    extra = ["--eval-files", evals] if name == "decontaminate" else []
    out = tmp_path / "out.jsonl"
    proc = run_tool(name, "--input", src, "--output", out, *extra)
    assert f"{src}:2: malformed JSON" in proc.stderr and f"{src}:3: missing key 'text'" in proc.stderr
    assert "skipped=2" in proc.stdout
    proc = run_tool(name, "--input", src, "--output", tmp_path / "strict.jsonl", "--strict", *extra, check=False)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith(f"error: {src}:2: malformed")
    assert not os.path.exists(tmp_path / "strict.jsonl") and not any(".tmp-" in n for n in os.listdir(tmp_path))
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(gzip.compress(src.read_bytes())[:-12])
    proc = run_tool(name, "--input", broken, "--output", out, *extra, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and "corrupt or truncated gzip data" in lines[0], proc.stderr
    proc = run_tool(name, "--input", tmp_path / "missing.jsonl", "--output", out, *extra, check=False)
    assert proc.returncode == 1 and proc.stderr.strip() == f"error: --input {tmp_path / 'missing.jsonl'}: no such file"


def test_spans_index_the_original_text_and_only_repeats_count_as_duplicates():
    from megatron_lite.data.curation.ngrams import words_with_spans
    from megatron_lite.data.curation.quality import _duplicate_ngram_chars

    text = "İstanbul was big. Ankara is the capital."  # "İ".lower() is two characters
    _, starts, ends = words_with_spans(text)
    assert [text[s:e] for s, e in zip(starts, ends)][:2] == ["İstanbul", "was"]
    assert text[starts[-1]:ends[-1]] == "capital"
    # Gopher counts the characters of repeats only: "a b" appears twice, the second is the repeat.
    assert _duplicate_ngram_chars(["a", "b", "a", "b"], 2) == pytest.approx(2 / 4)
    assert _duplicate_ngram_chars(["a", "b", "c", "d"], 2) == 0.0
