"""`diffkit export RUN --format saelens|dictionary_learning --out DIR`: a run's SAEs in another tool's files.

Both formats work on raw `ft − base` vectors: diffkit's scalar normaliser is folded into the weights
(`diffkit.sae.raw_space_weights`), so the other tool needs no normalisation step. The output keeps the
run's folder names (`layer_L/` or `layer_L_kK/`):

- saelens: `cfg.json` + `sae_weights.safetensors`, a JumpReLU SAE (`SAE.load_from_disk`);
- dictionary_learning: `ae.pt` (only the keys its BatchTopKSAE holds) + `config.json` with a `trainer`
  block (`dictionary_learning.utils.load_dictionary`, `BatchTopKSAE.from_pretrained`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffkit.configs import EXPORT_FORMATS, ExportConfig
from diffkit.errors import DiffkitError
from diffkit.files import write_folder, write_json
from diffkit.run import load_run
from diffkit.sae import BatchTopKSAE, raw_space_weights
from diffkit.saelens import SAELENS_CONFIG, SAELENS_WEIGHTS, hook_name, to_saelens


def provenance(run, entry) -> dict:
    return {"layer": entry.layer, "k": entry.k, "base_model": run.base, "finetuned_model": run.finetuned,
            "hook_name": hook_name(entry.layer), "model_name": run.finetuned,
            "input": "difference of residuals, finetuned minus base"}


def dictionary_learning_files(sae: BatchTopKSAE, info: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, ae.pt state dict) that upstream dictionary_learning's BatchTopKSAE loads unchanged."""
    state = {name: t.contiguous() for name, t in raw_space_weights(sae).items()}
    state["k"] = torch.tensor(int(sae.k), dtype=torch.int32)
    state["threshold"] = sae.threshold.detach().float().clone()
    trainer = {"dict_class": "BatchTopKSAE", "trainer_class": "BatchTopKTrainer", "activation_dim": sae.activation_dim,
               "dict_size": sae.dict_size, "k": int(sae.k), "layer": info["layer"], "lm_name": info["finetuned_model"],
               "submodule_name": f"resid_post_layer_{info['layer']}"}
    return {"trainer": trainer, "buffer": {"d_submodule": sae.activation_dim}, "diffkit": info}, state


def run_export(cfg: ExportConfig) -> dict:
    from safetensors.torch import save_file

    if cfg.format not in EXPORT_FORMATS:
        raise DiffkitError(f"unknown --format {cfg.format!r}; use one of: {', '.join(EXPORT_FORMATS)}")
    if not cfg.run or not cfg.out:
        raise DiffkitError("give the run directory and --out DIR, e.g. diffkit export runs/toy --format saelens --out exports/toy")
    run = load_run(cfg.run)
    files = {}
    for entry in run.saes:  # convert everything before writing anything: a bad SAE leaves no folder behind
        _, sae = run.sae(entry.layer, entry.k)
        if cfg.format == "saelens":
            files[entry.path.name] = to_saelens(raw_space_weights(sae), float(sae.threshold), provenance(run, entry))
        else:
            files[entry.path.name] = dictionary_learning_files(sae, provenance(run, entry))

    def write(folder: Path) -> None:
        for sub, (config, tensors) in files.items():
            (folder / sub).mkdir()
            if cfg.format == "saelens":
                save_file(tensors, str(folder / sub / SAELENS_WEIGHTS))
                write_json(folder / sub / SAELENS_CONFIG, config)
            else:
                torch.save(tensors, folder / sub / "ae.pt")
                write_json(folder / sub / "config.json", config)

    out = write_folder(cfg.out, write, overwrite=cfg.overwrite)
    written = sorted(str(p) for p in out.rglob("*") if p.is_file())
    if not cfg.json:
        print(f"wrote {len(files)} SAE(s) in {cfg.format} format to {out}")
    return {"out": str(out), "format": cfg.format, "files": written}
