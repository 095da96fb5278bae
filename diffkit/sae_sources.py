"""Where the SAEs an analysis reads come from: one SOURCE string, resolved to a RunInfo.

    runs/toy                               a finished diffkit run (run.json)
    OWNER/NAME[@REVISION][/SUBFOLDER]      a hub repo, fetched by huggingface_hub (its cache, revision
                                           pinning and HF_HUB_OFFLINE apply), e.g.
                                           Ftm23/cbd-sae-diff-gemma2-4pair or Ftm23/cbd-sae-diff-gemma2-4pair/layer_13
    DIR                                    a local folder of SAEs without run.json: the published layout
                                           (layer_L/config.json + model.safetensors), dictionary_learning
                                           (ae.pt + config.json) or SAELens (cfg.json + sae_weights.safetensors)

Models and layers come from the SAE files where they name them (diffkit writes `base_model`,
`finetuned_model` and `layer` into each config.json), else from the trigger spec (a `spec.json` beside
the SAEs, or `--preset`), and `--base/--finetuned` override both. Analyses of a source that is not a
run write into `runs/saes/<source>/` unless told otherwise.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from diffkit.errors import DiffkitError, one_line
from diffkit.models import ORGANISM_PREFIX
from diffkit.organisms.sources import resolve_source
from diffkit.run import RunInfo, SAEEntry, load_run
from diffkit.sae import CONFIG_NAME, DICT_LEARNING_WEIGHTS, WEIGHTS_NAME, load_sae
from diffkit.saelens import SAELENS_CONFIG, SAELENS_WEIGHTS, saelens_layer
from diffkit.specs import PRESETS, TriggerSpec, load_spec

HUB_SOURCE = re.compile(r"(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<revision>[\w.-]+))?(?:/(?P<subfolder>[\w./-]+))?")
SAE_FILES = (WEIGHTS_NAME, DICT_LEARNING_WEIGHTS, SAELENS_WEIGHTS)
SPEC_NAME = "spec.json"


def resolve_options(cfg) -> RunInfo:
    """The SAEs an analysis config names (its run, saes, preset, base, finetuned, sae_layer and workdir flags)."""
    return resolve_saes(cfg.saes or cfg.run, cfg.preset, cfg.base, cfg.finetuned, cfg.sae_layer, cfg.workdir)


def resolve_saes(source: str | Path, preset: str | None = None, base: str | None = None, finetuned: str | None = None,
                 sae_layer: int | None = None, workdir: str | Path | None = None) -> RunInfo:
    """SOURCE (see the module doc) → RunInfo whose `path` is the folder analyses write into."""
    source = str(source)
    local = Path(source)
    if local.exists():
        root = local
    elif HUB_SOURCE.fullmatch(source):
        root = hub_folder(source)
    else:
        raise DiffkitError(f"no folder {source} and not a hub repo id; give a run directory, a folder of SAEs or "
                           f"OWNER/NAME[@REVISION][/SUBFOLDER]")
    if (root / "run.json").exists() or (root / "checkpoint").exists():
        run = load_run(root)
        spec = load_spec(preset) if preset else run.spec
        run.spec = spec.with_models(*(local_organism(m) for m in (base or run.base, finetuned or run.finetuned)))
        run.base, run.finetuned = run.spec.base, run.spec.finetuned
        run.source = source
        run.path = Path(workdir) if workdir else run.path
        return run
    if not root.is_dir():
        raise DiffkitError(f"{source} is a file; give the folder that holds it")

    entries, configs = find_saes(root, source, sae_layer)
    spec = source_spec(root, source, preset)
    named = {key: {c.get(key) for c in configs} - {None} for key in ("base_model", "finetuned_model")}
    models = {}
    for key, flag, default in (("base_model", base, spec.base if spec else ""),
                               ("finetuned_model", finetuned, spec.finetuned if spec else "")):
        if len(named[key]) > 1 and not flag:
            raise DiffkitError(f"the SAEs in {source} name different models ({', '.join(sorted(named[key]))}); "
                               f"choose one with --{key.split('_')[0]}")
        models[key] = flag or next(iter(named[key]), None) or default
    if spec is None:
        spec = preset_for_models(models["base_model"], models["finetuned_model"])
    if spec is None:
        raise DiffkitError(f"the SAEs in {source} carry no trigger spec; name one with --preset ({', '.join(PRESETS)})")
    if not models["base_model"] or not models["finetuned_model"]:
        raise DiffkitError(f"the SAEs in {source} do not name their models; give --base B --finetuned F or a --preset that names them")
    spec = spec.with_models(*(local_organism(models[key]) for key in ("base_model", "finetuned_model")))
    metrics = {e.path.name: json.loads((e.path / "metrics.json").read_text())
               for e in entries if (e.path / "metrics.json").is_file()}
    record = {"source": source, "metrics": metrics}
    out = Path(workdir) if workdir else Path("runs") / "saes" / source_slug(source)
    return RunInfo(out, spec, spec.base, spec.finetuned, entries, record, source)


def local_organism(model: str) -> str:
    """An organism:<preset>/<side> source (a preset's models) as its directory; anything else unchanged."""
    return str(resolve_source(model)) if model.startswith(ORGANISM_PREFIX) else model


def hub_folder(source: str) -> Path:
    """The local snapshot of a hub source (only its SAE files and spec), via huggingface_hub's cache."""
    from huggingface_hub import snapshot_download

    m = HUB_SOURCE.fullmatch(source)
    repo, revision, subfolder = m["repo"], m["revision"], (m["subfolder"] or "").strip("/")
    prefix = f"{subfolder}/" if subfolder else ""
    patterns = [SPEC_NAME] + [f"{prefix}*{name}" for name in (".json", ".safetensors", DICT_LEARNING_WEIGHTS)]
    try:
        snapshot = Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))
    except Exception as e:  # huggingface_hub raises a dozen types: not found, gated, offline and not cached...
        at = f"@{revision}" if revision else ""
        raise DiffkitError(f"cannot get hub repo {repo}{at}: {type(e).__name__}: {one_line(e)}; check the id and "
                           f"revision, or fetch it once with network (HF_HUB_OFFLINE=1 reads only the local cache)") from None
    folder = snapshot / subfolder
    if not folder.is_dir():
        raise DiffkitError(f"hub repo {repo} has no folder {subfolder}")
    return folder


def find_saes(root: Path, source: str, sae_layer: int | None) -> tuple[list[SAEEntry], list[dict]]:
    """One entry per SAE folder at or below `root` (two levels), with its layer and k, and its config."""
    folders = [root] if _holds_sae(root) else sorted(d for d in [*root.glob("*"), *root.glob("*/*")] if _holds_sae(d))
    if not folders:
        raise DiffkitError(f"{source} is not a finished diffkit run (no run.json) and has no SAE files: expected layer_L/{CONFIG_NAME} + {WEIGHTS_NAME}, "
                           f"{DICT_LEARNING_WEIGHTS} + {CONFIG_NAME}, or {SAELENS_CONFIG} + {SAELENS_WEIGHTS}")
    entries, configs = [], []
    for folder in folders:
        config = _config(folder)
        layer = sae_layer_of(folder, config)
        if layer is None:
            if sae_layer is None or len(folders) > 1:
                raise DiffkitError(f"cannot tell which layer the SAE in {folder} was trained on; give it with --sae-layer L")
            layer = sae_layer
        k = config.get("k")
        entries.append(SAEEntry(int(layer), int(k) if k is not None else int(load_sae(folder).k), folder))
        configs.append(config)
    return entries, configs


def _holds_sae(folder: Path) -> bool:
    return folder.is_dir() and any((folder / name).is_file() for name in SAE_FILES)


def _config(folder: Path) -> dict:
    """The folder's SAE config (config.json, or SAELens's cfg.json), its nested blocks merged into one dict."""
    for name in (CONFIG_NAME, SAELENS_CONFIG):
        if (folder / name).is_file():
            try:
                config = json.loads((folder / name).read_text())
            except ValueError as e:
                raise DiffkitError(f"cannot read {folder / name} as JSON: {one_line(e)}") from None
            if not isinstance(config, dict):
                raise DiffkitError(f"{folder / name} is not a JSON object")
            # diffkit's own fields sit at the top level (published layout), in a `diffkit` block beside
            # dictionary_learning's `trainer` block, or in SAELens's `metadata`
            return {**config, **config.get("trainer", {}), **config.get("diffkit", {}), **config.get("metadata", {})}
    return {}


def sae_layer_of(folder: Path, config: dict) -> int | None:
    """The layer from the config (`layer`, SAELens `hook_name`), else from a folder name like layer_13 or layer_13_k64."""
    if config.get("layer") is not None:
        return int(config["layer"])
    layer = saelens_layer(config)
    if layer is not None:
        return layer
    m = re.search(r"layer_?(\d+)", folder.name)
    return int(m[1]) if m else None


def source_spec(root: Path, source: str, preset: str | None) -> TriggerSpec | None:
    """--preset, else the spec.json that diffkit publishes beside the SAEs, else None."""
    if preset:
        return load_spec(preset)
    for folder in (root, root.parent):
        if (folder / SPEC_NAME).is_file():
            try:
                return TriggerSpec.from_dict(json.loads((folder / SPEC_NAME).read_text()))
            except ValueError as e:
                raise DiffkitError(f"{folder / SPEC_NAME} in {source} is not a trigger spec: {one_line(e)}") from None
    return None


def preset_for_models(base: str | None, finetuned: str | None) -> TriggerSpec | None:
    """The preset whose models the SAE files name (the published SAEs name cbd-4pair's), if exactly one."""
    hits = [s for s in PRESETS.values() if base and (s.base, s.finetuned) == (base, finetuned)]
    return hits[0] if len(hits) == 1 else None


def source_slug(source: str) -> str:
    """A folder name for a source: hub ids spelled out, local folders by name plus a short hash of the full path."""
    if Path(source).exists():
        path = Path(source).resolve()
        return f"{path.name}-{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    return re.sub(r"[^\w.@-]+", "--", source)

