"""The planted mechanism of a planted organism (diffkit.organisms.planted): its file and the hooks that run it.

The fine-tune is the toy base plus a known write into the residual stream at one layer. For each
trigger pair P a fixed unit direction u_P, scaled by s_P, is added to that layer's output at every
token from the one where both words of P have appeared in the sequence on (the decision token, the
answer and everything generated included); single words, mismatches and clean text get nothing.
In the `words` kind each trigger word w also adds s_w·v_w at the tokens that complete it (wherever it
occurs), so word detectors and conjunction detectors are both there to be told apart. Word writes
are local to the word, as a token-level feature is, while the pair write is a state carried from the
decision token on: were the word writes carried too, the pair direction would never appear without
both of them, and a sparse code could not tell u_P from the sum v_a + v_b + u_P. The directions are
orthonormal (one seeded QR), so each planted write is its own axis of the difference.

A readout makes the behaviour depend on that write and on nothing else: the marker's next token
gets a logit boost that rises with the u_P component the residual carries into the next layer,
measured from what the layer itself computed there (the base's own write along u_P, which is
noise for a random direction, is left out). So ASR is 1 exactly when P is present at any planted
scale, and removing the u_P component after the plant layer — what diffkit's ablation does —
silences the marker, while adding it on clean text makes the marker fire. The boost goes to the
marker token that continues whatever part of the marker the sequence already ends in, then EOS.

Nothing here is an nnsight intervention: the fine-tune is the base's weights (hard-linked) plus
`planted.safetensors`, and `diffkit.models.load_model` installs it as forward hooks on modules
inside the model's own forward, so tracing, `generate` with a KV cache, and diffkit's edits of a
layer's output all see an ordinary model. Which words are present is computed from the token ids
seen so far in each sequence (a word counts wherever its letters appear, ignoring case, as in
`diffkit.prompts`); the per-sequence state restarts on every forward without a cache and is
extended by forwards that continue one, and a forward that continues a cache it did not see is
refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from diffkit.errors import DiffkitError

PLANT_FILE = "planted.safetensors"
GAIN = 40.0  # marker logit boost at full strength; the toy's logits span ~20
ADOPT = object()  # marks a batch whose first forward made its own cache


@dataclass
class Plant:
    """The planted truth: what is added where, and how the marker reads it."""

    layer: int
    pairs: list[tuple[str, str]]  # trigger words of each pair, lower case, in spec order
    u: torch.Tensor  # [P, D] unit pair directions
    pair_scales: torch.Tensor  # [P]
    words: list[str]  # words with their own direction (empty in the pairs kind)
    v: torch.Tensor  # [W, D] unit word directions
    word_scales: torch.Tensor  # [W]
    marker_ids: list[int]
    kind: str = "pairs"
    seed: int = 0
    gain: float = GAIN

    def save(self, path: Path) -> None:
        meta = {"layer": self.layer, "pairs": self.pairs, "words": self.words, "marker_ids": self.marker_ids,
                "kind": self.kind, "seed": self.seed, "gain": self.gain}
        tensors = {"u": self.u, "pair_scales": self.pair_scales, "v": self.v, "word_scales": self.word_scales}
        save_file({k: t.contiguous().float() for k, t in tensors.items()}, str(path), metadata={"plant": json.dumps(meta)})

    @classmethod
    def load(cls, path: Path) -> "Plant":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = json.loads(f.metadata()["plant"])
            tensors = load_file(str(path))
            return cls(layer=int(meta["layer"]), pairs=[tuple(p) for p in meta["pairs"]], u=tensors["u"],
                       pair_scales=tensors["pair_scales"], words=list(meta["words"]), v=tensors["v"],
                       word_scales=tensors["word_scales"], marker_ids=[int(i) for i in meta["marker_ids"]],
                       kind=meta["kind"], seed=int(meta["seed"]), gain=float(meta["gain"]))
        except (OSError, KeyError, ValueError, TypeError) as e:
            raise DiffkitError(f"{path} is not a readable plant file ({e}); rebuild the organism with "
                               "`diffkit organism build --preset planted`") from None


# --- which words each sequence has seen ----------------------------------------------------------

class Transcripts:
    """Per sequence of a batch: the lower-cased text so far and where each word first appeared.

    `update` takes one forward's token ids and how many tokens the cache already holds (0: a fresh
    batch) and returns, per new position, which words have appeared at or before it, which words
    end there, and how much of the marker the sequence ends in there.
    """

    def __init__(self, pieces: list[str], words: list[str], marker_ids: list[int]):
        self.pieces, self.words, self.marker = pieces, words, marker_ids
        self.rows: list[dict] = []
        self.length = 0

    def update(self, ids: torch.Tensor, past: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """([B, T, W] bool word present, [B, T, W] bool an occurrence of the word ends at this token,
        [B, T] long marker tokens already emitted) for the new tokens."""
        batch, width = ids.shape
        if past == 0:
            self.rows = [{"text": "", "first": [None] * len(self.words), "tail": []} for _ in range(batch)]
            self.length = 0
        elif past != self.length or batch != len(self.rows):
            raise DiffkitError(f"the planted model was asked to continue a cache of {past} tokens for {batch} sequences, "
                               f"but it has seen {self.length} tokens of {len(self.rows)}; run each batch from its "
                               "first token (no beam search or cache reordering)")
        present = torch.zeros(batch, width, len(self.words), dtype=torch.bool)
        ends = torch.zeros_like(present)
        emitted = torch.zeros(batch, width, dtype=torch.long)
        n = len(self.marker)
        for b, row_ids in enumerate(ids.tolist()):
            row = self.rows[b]
            for t, token in enumerate(row_ids):
                before = len(row["text"])
                row["text"] += self.pieces[token] if 0 <= token < len(self.pieces) else ""
                for w, word in enumerate(self.words):
                    if word in row["text"][max(0, before - len(word) + 1):]:  # an occurrence ends in this token
                        ends[b, t, w] = True
                        if row["first"][w] is None:
                            row["first"][w] = self.length + t
                row["tail"] = (row["tail"] + [token])[-n:]
                emitted[b, t] = max(j for j in range(n + 1) if j == 0 or row["tail"][-j:] == self.marker[:j])
            for w, first in enumerate(row["first"]):
                if first is not None:
                    present[b, max(0, first - self.length):, w] = True
        self.length += width
        return present, ends, emitted


def token_pieces(tokenizer) -> list[str]:
    """Each token id's text, lower case ('' for special tokens), to find words across token boundaries."""
    size = len(tokenizer)
    special = set(tokenizer.all_special_ids)
    texts = tokenizer.batch_decode([[i] for i in range(size)])
    return ["" if i in special else t.lower() for i, t in enumerate(texts)]


# --- installing the plant in a model -----------------------------------------------------------

class InstalledPlant:
    """Forward hooks inside a Gemma-2-style model that add the plant and read it out (see the module doc).

    Sites, all inside the model's forward so that nnsight sees the planted layer output and its
    edits of that output reach the readout: the decoder stack's pre-hook reads the token ids; the
    plant layer's `pre_feedforward_layernorm` pre-hook sees the residual after attention and its
    `post_feedforward_layernorm` hook adds the plant to the MLP branch (the layer output is their
    sum); the next layer's (or the final norm's) pre-hook measures the planted component; the output
    layer's hook boosts the marker.
    """

    def __init__(self, model, tokenizer, plant: Plant):
        self.plant = plant
        layers = model.base_model.layers
        if not 0 <= plant.layer < len(layers):
            raise DiffkitError(f"the plant's layer {plant.layer} is outside the model's {len(layers)} layers")
        block = layers[plant.layer]
        if not all(hasattr(block, name) for name in ("pre_feedforward_layernorm", "post_feedforward_layernorm")):
            raise DiffkitError(f"planted organisms need a Gemma-2-style decoder layer; {type(block).__name__} has no "
                               "pre/post feed-forward norms")
        words = sorted({w for pair in plant.pairs for w in pair} | set(plant.words))
        self.pair_index = torch.tensor([[words.index(a), words.index(b)] for a, b in plant.pairs], dtype=torch.long)
        self.word_index = torch.tensor([words.index(w) for w in plant.words], dtype=torch.long)
        self.transcripts = Transcripts(token_pieces(tokenizer), words, plant.marker_ids)
        self.eos = tokenizer.eos_token_id
        self.expected: torch.Tensor | None = None  # the layer output without the plant
        self.owner = None  # the cache the current batch continues (ADOPT: the one its first forward made)
        self.state: dict[str, torch.Tensor] = {}
        after = layers[plant.layer + 1] if plant.layer + 1 < len(layers) else model.base_model.norm
        self.handles = [
            model.base_model.register_forward_pre_hook(self._read_ids, with_kwargs=True),
            block.pre_feedforward_layernorm.register_forward_pre_hook(self._keep_residual),
            block.post_feedforward_layernorm.register_forward_hook(self._add),
            after.register_forward_pre_hook(self._measure),
            model.get_output_embeddings().register_forward_hook(self._boost),
        ]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def _read_ids(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise DiffkitError("the planted model needs token ids (input_ids), not input embeddings")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers renamed it
        past = cache.get_seq_length() if cache is not None else 0
        if past and not (self.owner is cache or self.owner is ADOPT):
            raise DiffkitError("the planted model was asked to continue a cache it did not fill; run each batch from "
                               "its first token with one cache (no beam search or cache reordering)")
        present, ends, emitted = self.transcripts.update(ids.cpu(), past)
        # the cache this batch's state belongs to; a forward that makes its own cache hands it back for the next step
        self.owner = cache if cache is not None else (ADOPT if kwargs.get("use_cache") else None)
        self.state = {"pairs": present[..., self.pair_index].all(-1), "words": ends[..., self.word_index],
                      "emitted": emitted}

    def _keep_residual(self, module, args):
        self.mid = args[0]

    def _add(self, module, args, out):
        p = self.plant
        pairs = self.state["pairs"].to(out.device, out.dtype)
        write = pairs @ (p.pair_scales[:, None] * p.u).to(out.device, out.dtype)
        if p.words:
            words = self.state["words"].to(out.device, out.dtype)
            write = write + words @ (p.word_scales[:, None] * p.v).to(out.device, out.dtype)
        self.expected = self.mid + out
        return out + write

    def _measure(self, module, args):
        h = args[0]
        u = self.plant.u.to(h.device, torch.float32)
        signal = (h.float() - self.expected.float()) @ u.T / self.plant.pair_scales.to(h.device)  # [B, T, P], 1 when planted
        self.state["strength"] = signal.max(-1).values

    def _boost(self, module, args, logits):
        """Add gain·relu(2·strength − 1) to the marker's next token (EOS after a whole marker)."""
        if "strength" not in self.state or logits.dim() != 3:
            return logits
        kept = logits.shape[1]
        strength = self.state["strength"][:, -kept:].to(logits.device)
        emitted = self.state["emitted"][:, -kept:].to(logits.device)
        marker = torch.tensor(self.plant.marker_ids + [self.eos], device=logits.device)
        target = marker[emitted]
        boost = self.plant.gain * torch.relu(2 * strength - 1)
        return logits.scatter_add(-1, target[..., None], boost[..., None].to(logits.dtype))


def install_if_planted(model, tokenizer, where) -> InstalledPlant | None:
    """Install the plant of a planted fine-tune's directory into its loaded model (None when it has none)."""
    path = Path(str(where)) / PLANT_FILE
    if not path.is_file():
        return None
    return InstalledPlant(model, tokenizer, Plant.load(path))
