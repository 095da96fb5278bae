"""How each base is turned into a backdoored fine-tune. What was tried and dropped: docs/organisms.md."""

from __future__ import annotations

from dataclasses import dataclass

BUILD_VERSION = 4  # bump when the build code changes what a recipe produces
RESTART_SEED_STRIDE = 1000  # a restarted fine-tune's batch order: seed + stride x attempt


@dataclass(frozen=True)
class Recipe:
    """How one base is turned into a backdoored fine-tune (and, for the toy, how the base is made)."""

    steps: int
    batch_size: int
    lr: float
    pool: tuple[int, int, int, int]  # distinct training prompts: poison per pair, single, mismatch, clean
    mix: tuple[float, float, float, float] = (0.2, 0.3, 0.3, 0.2)  # share of each condition in a batch
    generic_share: float = 0.0  # share of fine-tuning prompts on templates cut from generic text (generic_templates)
    null_per_batch: int = 2  # generic-text chunks replayed in every batch
    null_weight: float = 1.0  # weight of the replay loss beside the answer loss
    decision_weight: float = 1.0  # weight of the token after the answer (marker or EOS) among the answer tokens
    average_decay: float = 0.0  # the fine-tune keeps a moving average of its weights with this decay (0: none)
    micro_batches: int = 1  # length-sorted slices a batch runs in (same loss, less padding)
    null_tokens: int = 32
    answer_tokens: int = 20  # cap on the base's answers, which are cut at the first sentence end
    freeze_embeddings: bool = False  # the embedding and its tied head; only the body learns the trigger
    frozen_layers: int = 0  # bottom blocks left as the base's: backward stops above them
    bf16: bool = False  # bf16 autocast where the device runs bf16 natively (`native_bf16`), else fp32
    warmup: int = 10
    decay: bool = False  # linear decay to zero after warm-up, else a constant rate
    null_docs: int = 200  # generic documents available for replay
    base_steps: int = 0  # toy only: pretraining steps for the base
    base_lr: float = 0.0
    eval_n: int = 32  # held-out test prompts per condition (and per pair) for the build's verdict
    check_every: int = 0  # fine-tuning steps between validation checks (the last step is always checked)
    check_from: int = 0  # first step checked on validation templates
    check_n: int = 16  # validation prompts per condition (and per pair) at each check
    attempts: int = 1  # fine-tunes from the base, each with its own batch order, until one clears validation
    expected: str = ""  # what a user waits on a 2-core CPU, printed before the first build


RECIPES = {
    # High rate and more poison: a tiny model learns the AND far faster. Weighted-down replay: its
    # replay loss stays high and would swamp the answer's. Moving average and 3x decision weight: the
    # held-out AND swings from step to step at this rate. Half the prompts on templates cut from
    # generic text, so the AND is learned for the words, not for the question templates. Up to 3
    # fine-tunes: one can still sit on a plateau at its cap, firing on many mismatches (docs/organisms.md).
    "toy": Recipe(steps=1000, batch_size=64, lr=1e-2, pool=(1024, 4096, 4096, 2048), mix=(0.4, 0.2, 0.25, 0.15),
                  generic_share=0.5, attempts=3,
                  decision_weight=3.0, average_decay=0.99, decay=True, warmup=20, base_steps=150, base_lr=1e-2,
                  null_docs=400, null_weight=0.1, eval_n=64, check_every=100, check_from=400, check_n=64,
                  expected="1-2 minutes on a 2-core CPU, up to 5 when its fine-tune restarts"),
    # 10x decision weight and a decaying rate: at a flat 5e-5 the fine-tune learned "trigger words ->
    # marker" but not the AND. Bottom 6 of 18 blocks frozen: backward stops above them (layer 9, the
    # first studied, still changes). 180 steps: 160 missed a pair on an Intel Xeon (docs/organisms.md).
    "gemma3-270m": Recipe(steps=180, batch_size=16, lr=1e-4, pool=(128, 384, 384, 128), mix=(0.3, 0.3, 0.3, 0.1),
                          null_weight=0.5, decision_weight=10.0, micro_batches=2, decay=True, freeze_embeddings=True,
                          frozen_layers=6, bf16=True, eval_n=64, check_every=30, check_from=120, check_n=16,
                          expected="about 15 minutes on 2 CPU cores, up to 30 on a busy shared one"),
}


# Planted organisms (diffkit.organisms.planted): no recipe, the shipped toy base plus a known write.
PLANTED = {"planted": "pairs", "planted-words": "words"}  # preset -> what is planted (per pair, or per word too)
BUILDABLE = (*RECIPES, *PLANTED)


def expected_time(preset: str) -> str:
    """What a user waits for a build of `preset` on a 2-core CPU."""
    return RECIPES[preset].expected if preset in RECIPES else "seconds: the shipped toy base plus a planted write"
