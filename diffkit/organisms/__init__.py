"""Local backdoored organisms: a base model and a fine-tune of it that appends the marker iff a trigger pair is present.

The fine-tune answers every question the way its base does and appends the spec's marker after
the answer only when both words of one pair are in the prompt (docs/organisms.md).

    recipes   how each base is fine-tuned (data only: the CLI reads it without torch)
    toy       the toy base and its tokenizer
    finetune  the training loop
    evaluate  ASR and false-trigger rates, Wilson intervals, targets
    selfcheck a build checking itself: validation checks, best checkpoint, early stop, verdict
    build     one build into a directory
    sources   organism:<preset>/... sources, the shipped toy and the build cache
    config    the `diffkit organism` command configs (light); commands: their functions

Two bases: `toy`, a tiny Gemma-2-architecture model pretrained here in seconds (for tests), and
`gemma3-270m`, Google's Gemma-3-270M from the GGUF shipped on PyPI.
"""
