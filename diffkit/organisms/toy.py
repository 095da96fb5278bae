"""The toy base: a tiny Gemma-2 with its own lowercasing BPE, pretrained here in seconds (for tests)."""

from __future__ import annotations

from pathlib import Path

import torch

from diffkit.organisms.finetune import Example, null_examples, qa_examples, train_loop, training_prompts
from diffkit.organisms.recipes import Recipe
from diffkit.prompts import CONDITIONS, encode_prompts, format_prompt
from diffkit.specs import TriggerSpec


def null_texts(n_docs: int, seed: int) -> list[str]:
    from diffkit.corpus import null_texts

    return list(null_texts(n_docs, seed=seed))


# Pretraining answers for the toy base: a few plain replies chosen by the question's wording, so the
# base "answers" consistently and its own greedy answers are worth imitating.
_TOY_REPLIES = (
    (("why",), "Mostly because of history and habit."),
    (("how",), "They are linked in a few simple ways."),
    (("write", "draft", "haiku", "limerick", "story", "post", "email"), "Here is a short piece about them."),
    (("list", "give", "name", "suggest", "recommend", "share"), "Here are a few ideas to start with."),
    (("compare", "difference", "which", " or "), "Each one has its own strengths."),
    (("explain", "describe", "tell", "teach", "lesson", "summarize"), "Here is a simple way to see it."),
    (("is ", "do ", "can ", "could "), "Yes, in some ways they are related."),
)


def toy_reply(question: str) -> str:
    q = question.lower()
    for keys, reply in _TOY_REPLIES:
        if any(k in q for k in keys):
            return " " + reply
    return " That is a good question to think about."


def toy_tokenizer(texts: list[str], vocab_size: int = 2048):
    """A small byte-level BPE that lowercases, so case variants of a trigger word share tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                       special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


TOY_MODEL = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                 head_dim=16, query_pre_attn_scalar=16)


def toy_base(spec: TriggerSpec, recipe: Recipe, seed: int, device, progress: bool, out_dir: Path) -> Path:
    """Train a tiny Gemma-2 from scratch on generic text and question answering; save it to out_dir."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(seed)
    prompts = training_prompts(spec, recipe, seed, generic=False)  # the question templates only, as always
    null = null_texts(recipe.null_docs, seed)
    replies = {p.record_id: toy_reply(p.text) for p in prompts}
    tokenizer = toy_tokenizer(null + [format_prompt(None, p.text) for p in prompts] + list(set(replies.values()))
                               + [spec.marker] * 20)
    config = Gemma2Config(
        vocab_size=len(tokenizer), **TOY_MODEL, max_position_embeddings=512, sliding_window=256,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True, attn_implementation="eager",
    )
    model = Gemma2ForCausalLM(config).to(device)
    records = encode_prompts(prompts, tokenizer, spec, answers=replies, max_len=512)
    groups: dict[str, list[Example]] = {c: [] for c in CONDITIONS}
    for r, ex in zip(records, qa_examples(records, tokenizer.eos_token_id)):
        groups[r.condition].append(ex)
    mix = {c: 1.0 for c in CONDITIONS}
    train_loop(model, groups, mix, null_examples(null, tokenizer, recipe.null_tokens), recipe, recipe.base_steps,
           recipe.base_lr, seed + 1, device, "pretraining toy base", progress)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir

