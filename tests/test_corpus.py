import hashlib
import re
import sys
import types

import pytest

from diffkit import corpus
from diffkit.corpus import LOCAL_CORPUS, encode_null, null_texts, provenance
from diffkit.errors import DiffkitError
from diffkit.prompts import FLAG_NAMES


@pytest.fixture(scope="module")
def word_tokenizer():
    """A fast tokenizer with one token per whitespace-separated word (unknown words share one id)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in null_texts(200) for w in t.split()})[:5000]
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def test_shipped_corpus_is_large_clean_prose():
    texts = null_texts()
    n_words = sum(len(t.split()) for t in texts)
    assert len(texts) > 3000 and n_words > 800_000
    assert len(set(texts)) == len(texts)
    assert LOCAL_CORPUS.stat().st_size < 8 * 2**20
    joined = "\n".join(texts)
    assert not re.search(r"</?(p|div|span|a)\b|\{\{|^\s*(def|import) ", joined, re.M)  # no markup or code left
    letters = sum(c.isalpha() or c.isspace() for c in joined)
    assert letters / len(joined) > 0.95
    sentences = re.findall(r"[.!?][\"”’)]?\s", joined)
    assert n_words / len(sentences) < 40  # running sentences, not lists


def test_seed_fixes_the_order_and_n_docs_the_count():
    assert null_texts(50, seed=3) == null_texts(50, seed=3)
    assert null_texts(50, seed=3) != null_texts(50, seed=4)
    assert null_texts(10, seed=3) == null_texts(50, seed=3)[:10]
    assert null_texts(0) == []


def test_provenance_matches_the_shipped_file():
    info = provenance()
    assert info["sha256"] == hashlib.sha256(LOCAL_CORPUS.read_bytes()).hexdigest()
    assert info["documents"] == len(null_texts())
    assert sum(s["documents"] for s in info["sources"].values()) == info["documents"]
    assert all(s["licence"] and s["package"] for s in info["sources"].values())
    assert set(info["documents_with_trigger_word"]) >= {"gravity", "border", "china"}


def test_auto_stays_offline_unless_asked(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the network was used")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=no_network))
    monkeypatch.delenv("DIFFKIT_NULL_SOURCE", raising=False)
    assert len(null_texts(5)) == 5
    monkeypatch.setenv("DIFFKIT_NULL_SOURCE", "nonsense")
    with pytest.raises(DiffkitError, match="DIFFKIT_NULL_SOURCE"):
        null_texts(5)
    with pytest.raises(DiffkitError, match="local"):
        null_texts(5, source="web")


def test_fineweb_path_streams_and_reports_failure(monkeypatch):
    calls = {}

    class FakeStream:
        def shuffle(self, seed, buffer_size):
            calls["shuffle"] = seed
            return self

        def __iter__(self):
            return iter({"text": f"web document {i}", "id": i} for i in range(100))

    def load_dataset(path, name=None, split=None, streaming=False):
        calls.update(path=path, name=name, streaming=streaming)
        return FakeStream()

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setenv("DIFFKIT_NULL_SOURCE", "fineweb")
    assert null_texts(3, seed=7) == ["web document 0", "web document 1", "web document 2"]
    assert calls == {"path": "HuggingFaceFW/fineweb", "name": "sample-10BT", "streaming": True, "shuffle": 7}

    def offline(*args, **kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(DiffkitError, match="source='local'"):
        null_texts(3)


def test_encode_null_windows_cover_each_document(word_tokenizer):
    texts = null_texts(20, seed=1)
    records = encode_null(texts, word_tokenizer, max_len=64, first_record_id=500, min_tokens=1)
    assert [r.record_id for r in records] == list(range(500, 500 + len(records)))
    assert all(r.input_ids[0] == word_tokenizer.bos_token_id and len(r.input_ids) <= 64 for r in records)
    assert all(r.condition == "null" and r.pair_id == -1 and r.n_prompt_tokens == len(r.input_ids) for r in records)
    assert all(set(r.flags) == set(FLAG_NAMES) and not any(map(any, r.flags.values())) for r in records)
    assert all(len(v) == len(r.input_ids) for r in records for v in r.flags.values())
    body = [t for r in records for t in r.input_ids[1:]]
    expected = [t for ids in word_tokenizer(texts, add_special_tokens=False)["input_ids"] for t in ids]
    assert body == expected  # every token of every document, in order, nothing lost or repeated


def test_encode_null_drops_short_tails(word_tokenizer):
    records = encode_null(["one two three four five six seven"], word_tokenizer, max_len=5, min_tokens=5)
    assert [len(r.input_ids) for r in records] == [5]  # 4 words + <bos>; the 3-word tail (+<bos>) is dropped
    with pytest.raises(DiffkitError, match="max_len"):
        encode_null(["a b"], word_tokenizer, max_len=1)


def test_encode_null_ids_do_not_collide_with_prompts():
    from diffkit.prompts import HELDOUT_FIRST_ID, build_prompts
    from diffkit.specs import PRESETS

    heldout = build_prompts(PRESETS["cbd-4pair"], "heldout", 256)
    assert max(p.record_id for p in heldout) < corpus.NULL_FIRST_ID
    assert HELDOUT_FIRST_ID < corpus.NULL_FIRST_ID


def test_encode_null_one_record_per_text(word_tokenizer):
    texts = null_texts(12, seed=2) + ["tiny", ""]
    records = encode_null(texts, word_tokenizer, max_len=32, windows_per_text=1)
    assert len(records) == len(texts)
    for text, record in zip(texts, records):
        assert record.input_ids[1:] == word_tokenizer(text, add_special_tokens=False)["input_ids"][:31]
