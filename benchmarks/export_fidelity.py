"""How exactly SAELens and upstream dictionary_learning reproduce a run's latents from diffkit's exports.

Exports every SAE of RUN in both formats (into a temporary folder), loads them with `sae_lens.SAE.load_from_disk`
and dictionary_learning's `BatchTopKSAE.from_pretrained`, encodes the run's own held-out `ft − base` vectors
(prompts of every condition and null text), and prints per SAE whether the active latents are the same and
the largest |Δ| relative to the largest activation, beside the bound the tests hold (1e-4):

    PYTHONPATH=.venv/reference python -m benchmarks.export_fidelity runs/toy
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from analyses.stats import heldout_records, load_run_pair
from benchmarks.bench_sae_step import load_reference_trainer
from diffkit.export import ExportConfig, run_export
from diffkit.run import load_run
from diffkit.tracing import concat_batches, trace_differences

BOUND = 1e-4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--prompts", type=int, default=16, help="held-out prompts per condition")
    args = parser.parse_args()
    from sae_lens import SAE

    load_reference_trainer()
    upstream = sys.modules["dictionary_learning.trainers.batch_top_k"].BatchTopKSAE
    run = load_run(args.run)
    pair = load_run_pair(run)
    records, _ = heldout_records(run.spec, pair.tokenizer, n_per_condition=args.prompts, n_null=2 * args.prompts)
    diffs = concat_batches(list(trace_differences(pair, records, run.layers, batch_size=16))).diffs
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("saelens", "dictionary_learning"):
            run_export(ExportConfig(run=args.run, format=fmt, out=f"{tmp}/{fmt}", json=True))
        print(f"{'SAE':<14} {'format':<20} {'tokens':>7} {'active':>8} {'same set':>8} {'max|Δ|/max f':>13} (bound {BOUND:g})")
        for e in run.saes:
            x = diffs[e.layer]
            config = json.loads(Path(f"{tmp}/dictionary_learning/{e.path.name}/config.json").read_text())
            theirs = {"saelens": SAE.load_from_disk(f"{tmp}/saelens/{e.path.name}"),
                      "dictionary_learning": upstream.from_pretrained(f"{tmp}/dictionary_learning/{e.path.name}/ae.pt",
                                                                      k=config["trainer"]["k"], device="cpu")}
            with torch.no_grad():
                want = run.sae(e.layer, e.k)[1].encode_raw(x)
                for fmt, sae in theirs.items():
                    got = sae.encode(x)
                    rel = float((got - want).abs().max() / want.abs().max())
                    print(f"{e.path.name:<14} {fmt:<20} {x.shape[0]:>7} {int((want > 0).sum()):>8} "
                          f"{str(torch.equal(got > 0, want > 0)):>8} {rel:>13.1e}")


if __name__ == "__main__":
    main()
