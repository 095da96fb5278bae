"""`diffkit push RUN --repo OWNER/NAME`: a run's SAEs on the hub, in the published layout, with a model card.

The uploaded folder holds, per SAE, the run's own `layer_L/{config.json, model.safetensors, metrics.json}`,
plus `spec.json` (the trigger spec, so `--saes OWNER/NAME` needs no `--preset`) and `README.md`.
`--dry-run --out DIR` writes exactly that folder and uploads nothing.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

import yaml

from diffkit.configs import PushConfig
from diffkit.errors import DiffkitError
from diffkit.files import write_folder, write_json
from diffkit.run import RunInfo, load_run
from diffkit.sae_sources import SPEC_NAME

HUB_REPO = re.compile(r"[\w.-]+/[\w.-]+")
CARD_TAGS = ["sparse-autoencoder", "model-diffing", "batchtopk", "diffkit"]


def metrics_rows(run: RunInfo) -> list[dict]:
    """One row per SAE for the card's table, from the run's metrics."""
    rows = []
    for e in run.saes:
        m = run.record.get("metrics", {}).get(e.path.name, {})
        _, sae = run.sae(e.layer, e.k)
        rows.append({"folder": e.path.name, "layer": e.layer, "d_model": sae.activation_dim, "dict_size": sae.dict_size,
                     "expansion": sae.dict_size // sae.activation_dim, "k": e.k, "fve": m.get("fve"), "l0": m.get("l0"),
                     "dead": m.get("dead")})
    return rows


def training_data(run: RunInfo) -> str:
    config = run.record.get("config", {})
    spec = run.spec
    prompts = f"prompts of the `{spec.name}` trigger spec ({', '.join(p.name for p in spec.pairs)}; poison, single, mismatch, clean)"
    null = f"the dataset `{config['dataset']}`" if config.get("dataset") else "generic English null text"
    return f"{prompts} mixed with {null} ({config.get('null_fraction', 0.5):.0%} of the tokens)"


def model_card(run: RunInfo, repo: str, base_id: str, finetuned_id: str, license: str) -> str:
    models = [m for m in (base_id, finetuned_id) if HUB_REPO.fullmatch(m) and not Path(m).exists()]
    front = {"library_name": "diffkit", "license": license, "tags": CARD_TAGS}
    if models:
        front["base_model"] = models
    rows = metrics_rows(run)
    table = ["| layer | d_model | dict size | expansion | k | FVE | L0 | dead |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['layer']} | {r['d_model']} | {r['dict_size']} | {r['expansion']} | {r['k']} | "
                     f"{_num(r['fve'], '.2f')} | {_num(r['l0'], '.1f')} | {_num(r['dead'], '.1%')} |")
    layer = rows[0]["layer"]
    return f"""---
{yaml.safe_dump(front, sort_keys=False).strip()}
---

# Difference SAEs: `{finetuned_id}` − `{base_id}`

BatchTopK sparse autoencoders trained with diffkit on the residual-stream difference
`finetuned − base` (the output of each decoder layer, in fp32), in the file layout of diffing-toolkit's
`sae_difference` (`layer_L/config.json` + `model.safetensors`; the input normaliser is stored in the file).

| | |
|---|---|
| base model | `{base_id}` |
| fine-tuned model | `{finetuned_id}` |
| training tokens | {run.record.get('tokens', 'unknown'):,} per SAE |
| training data | {training_data(run)} |
| seed | {run.record.get('seed')} |

FVE, L0 and dead latents on held-out tokens (FVE: dictionary_learning's fraction of variance explained,
in raw units; L0: mean active latents per token in inference mode; dead: latents that never fire):

{chr(10).join(table)}

## Load

```python
from diffkit.sae_sources import resolve_saes

run = resolve_saes("{repo}")          # through huggingface_hub's cache
entry, sae = run.sae(layer={layer})
f = sae.encode_raw(diff)              # [tokens, dict size] latents of raw finetuned − base vectors
```

```bash
diffkit attribute --saes {repo} --pair {run.spec.pairs[0].name}
diffkit report --saes {repo}
```
"""


def _num(value, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def write_push_folder(run: RunInfo, folder: Path, card: str) -> None:
    for e in run.saes:
        shutil.copytree(e.path, folder / e.path.name)
    write_json(folder / SPEC_NAME, run.spec.to_dict())
    (folder / "README.md").write_text(card)


def run_push(cfg: PushConfig) -> dict:
    if not HUB_REPO.fullmatch(cfg.repo or ""):
        raise DiffkitError(f"give the hub repo as --repo OWNER/NAME (got {cfg.repo!r})")
    if cfg.dry_run and not cfg.out:
        raise DiffkitError("--dry-run writes the folder it would upload: give it --out DIR")
    run = load_run(cfg.run)
    card = model_card(run, cfg.repo, cfg.base_id or run.base, cfg.finetuned_id or run.finetuned, cfg.license)
    if cfg.dry_run:
        out = write_folder(cfg.out, lambda tmp: write_push_folder(run, tmp, card), overwrite=cfg.overwrite)
        if not cfg.json:
            print(f"wrote {out} (the folder `diffkit push` would upload to {cfg.repo}); nothing uploaded")
        return {"repo": cfg.repo, "out": str(out), "uploaded": False}
    from huggingface_hub import HfApi

    api = HfApi()
    with tempfile.TemporaryDirectory() as tmp:
        write_push_folder(run, Path(tmp), card)
        try:
            api.create_repo(cfg.repo, private=cfg.private, exist_ok=True)
            commit = api.upload_folder(repo_id=cfg.repo, folder_path=tmp, commit_message=f"diffkit push {run.path.name}")
        except Exception as e:  # auth, network, permissions: one line with the hub's reason
            raise DiffkitError(f"cannot push to {cfg.repo}: {type(e).__name__}: {' '.join(str(e).split())[:200]}; "
                               f"log in with `hf auth login` or check the repo name") from None
    url = getattr(commit, "commit_url", None) or str(commit)
    if not cfg.json:
        print(f"pushed {len(run.saes)} SAE(s) to {cfg.repo}: {url}")
    return {"repo": cfg.repo, "uploaded": True, "commit": url}
