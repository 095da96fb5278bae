"""Analyses of a trained difference-SAE run: which latents carry the fine-tune's triggers.

stats (sparse latent activations on held-out prompts, per-split statistics) → ranking (AUROC and
specificity per trigger pair) → grid (pairs across relatedness × charged-ness) → causal (ablation,
attribution patching, steering) → plots / attribute / report (tables and standalone HTML figures).
"""
