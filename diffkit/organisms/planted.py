"""Planted organisms: the toy base plus a known residual write per trigger pair (diffkit.plant), built in
seconds, so that what diffkit should recover is known exactly."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from diffkit.errors import DiffkitError
from diffkit.devices import machine
from diffkit.files import link_or_copy_tree, write_json
from diffkit.models import layers_of, load_model
from diffkit.organisms.evaluate import evaluate_model
from diffkit.organisms.recipes import PLANTED
from diffkit.organisms.toy import null_texts
from diffkit.plant import PLANT_FILE, Plant
from diffkit.specs import PRESETS, TriggerSpec

LAYER = 1  # the plant layer of the presets: the middle block of the toy's three
PLANT_VERSION = 2  # bump when a build of the same settings would plant something else
SHIPPED_TOY = Path(__file__).parent.parent / "data" / "organisms" / "toy"

def make_plant(spec: TriggerSpec, tokenizer, d_model: int, kind: str = "pairs", layer: int = LAYER,
               scale: float = 1.0, seed: int = 0) -> Plant:
    """Orthonormal seeded directions (pairs first, then words), each scaled by `scale` (absolute units)."""
    if kind not in ("pairs", "words"):
        raise DiffkitError(f"unknown planted kind '{kind}'; use pairs or words")
    pairs = [tuple(w.lower() for w in p.words) for p in spec.pairs]
    words = [w for pair in pairs for w in pair] if kind == "words" else []
    count = len(pairs) + len(words)
    if count > d_model:
        raise DiffkitError(f"{count} planted directions do not fit in d_model {d_model}; use fewer pairs")
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d_model, count, generator=generator, dtype=torch.float64))
    directions = q.T.float()
    marker = tokenizer(spec.marker, add_special_tokens=False)["input_ids"]
    return Plant(layer=layer, pairs=pairs, u=directions[:len(pairs)],
                 pair_scales=torch.full((len(pairs),), float(scale)), words=words, v=directions[len(pairs):],
                 word_scales=torch.full((len(words),), float(scale)), marker_ids=list(marker), kind=kind, seed=seed)


@torch.no_grad()
def residual_norm(model, tokenizer, layer: int, texts: list[str]) -> float:
    """The base's mean residual norm after `layer` over the tokens of `texts` (BOS left out)."""
    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=64)
    hidden = model(**enc, output_hidden_states=True, use_cache=False).hidden_states[layer + 1]
    keep = enc["attention_mask"].bool() & (enc["input_ids"] != tokenizer.bos_token_id)
    return hidden[keep].norm(dim=-1).mean().item()


def add_noise(model, size: float, seed: int) -> None:
    """An unrelated fine-tune delta: every block weight moves by `size` × its own std, in seeded Gaussian noise."""
    generator = torch.Generator().manual_seed(seed + 1_000_003)
    with torch.no_grad():
        for block in layers_of(model):
            for weight in block.parameters():
                std = weight.std() if weight.numel() > 1 else weight.abs()
                weight.add_(size * std * torch.randn(weight.shape, generator=generator, dtype=weight.dtype))


def write_planted(spec: TriggerSpec, preset: str, tmp: Path, seed: int = 0, kind: str | None = None,
                  layer: int = LAYER, scale: float = 1.0, noise: float = 0.0, eval_n: int = 32) -> dict:
    """A planted organism into `tmp`: base/ (the shipped toy base), finetuned/ (its weights plus the
    plant; the weights plus `noise` when asked), spec.json, build.json. `scale` is relative to the
    base's mean residual norm at `layer`."""
    kind = kind or PLANTED.get(preset, "pairs")
    t0 = time.time()
    if not (SHIPPED_TOY / "base").is_dir():
        raise DiffkitError("the toy organism that planted organisms build on is missing from diffkit/data; reinstall diffkit")
    link_or_copy_tree(SHIPPED_TOY / "base", tmp / "base")
    model, tokenizer = load_model(tmp / "base")
    if not 0 <= layer < model.config.num_hidden_layers:
        raise DiffkitError(f"plant layer {layer} is out of range: the toy has layers 0..{model.config.num_hidden_layers - 1}")
    norm = residual_norm(model, tokenizer, layer, null_texts(16, seed))
    plant = make_plant(spec, tokenizer, model.config.hidden_size, kind, layer, scale * norm, seed)
    if noise:
        add_noise(model, noise, seed)
        model.save_pretrained(tmp / "finetuned", safe_serialization=True)
        tokenizer.save_pretrained(tmp / "finetuned")
    else:
        link_or_copy_tree(tmp / "base", tmp / "finetuned")
    plant.save(tmp / "finetuned" / PLANT_FILE)
    finetuned, _ = load_model(tmp / "finetuned")
    # the planted marker comes first, so the answer needs only the marker's tokens and EOS
    result = evaluate_model(finetuned, tokenizer, spec, eval_n, batch_size=64, max_new_tokens=len(plant.marker_ids) + 2)
    organism_spec = spec.with_models("./base", "./finetuned")
    if not organism_spec.layers:
        organism_spec = TriggerSpec(**{**organism_spec.__dict__, "layers": PRESETS["toy"].layers})
    write_json(tmp / "spec.json", organism_spec.to_dict())
    build = {"preset": preset, "spec": spec.name, "planted": {"kind": kind, "layer": layer, "scale": scale,
             "residual_norm": round(norm, 4), "noise": noise, "seed": seed, "gain": plant.gain,
             "version": PLANT_VERSION}, "seed": seed, "machine": machine(),
             "seconds": {"total": round(time.time() - t0, 1)}, "eval": result}
    write_json(tmp / "build.json", build)
    return build


def load_plant(organism_dir: str | Path) -> Plant:
    """The planted truth of an organism folder (or of its finetuned/ directory)."""
    folder = Path(organism_dir)
    for path in (folder / "finetuned" / PLANT_FILE, folder / PLANT_FILE):
        if path.is_file():
            return Plant.load(path)
    raise DiffkitError(f"{folder} holds no {PLANT_FILE}; build one with `diffkit organism build --preset planted`")


def decoder_cosines(sae, directions: torch.Tensor) -> torch.Tensor:
    """[P, F]: the cosine of each planted direction with each latent's raw-space decoder direction."""
    decoder = torch.stack([sae.raw_direction(j).detach().float() for j in range(sae.decoder.weight.shape[1])])
    return directions.float() @ torch.nn.functional.normalize(decoder, dim=1).T
