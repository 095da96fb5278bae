"""BatchTopK SAE and trainer on planted sparse structure: what it recovers, and that its state behaves."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F

from diffkit.metrics import evaluate_sae, format_metrics_table
from diffkit.sae import BatchTopKSAE, batch_topk, fit_normalization
from diffkit.trainer import SAETrainConfig, SAETrainer, geometric_median

D_MODEL, N_DIRS, ACTIVE, K, BATCH = 64, 128, 4, 4, 256


class Planted:
    """Tokens = sparse non-negative mixtures of N_DIRS unit directions + a big shared offset + noise."""

    def __init__(self, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.dirs = torch.randn(N_DIRS, D_MODEL, generator=gen)
        self.dirs /= self.dirs.norm(dim=1, keepdim=True)
        self.offset = 40.0 * torch.randn(D_MODEL, generator=gen)
        self.gen = gen

    def sample(self, n: int) -> torch.Tensor:
        idx = torch.rand(n, N_DIRS, generator=self.gen).argsort(1)[:, :ACTIVE]
        mag = torch.rand(n, ACTIVE, generator=self.gen) * 1.5 + 0.5
        codes = torch.zeros(n, N_DIRS).scatter_(1, idx, mag)
        return codes @ self.dirs + self.offset + 0.01 * torch.randn(n, D_MODEL, generator=self.gen)


def make_trainer(data: Planted, **overrides) -> SAETrainer:
    config = SAETrainConfig(k=K, expansion=4, warmup_steps=20, threshold_start_step=100, dead_tokens=50 * BATCH)
    for key, value in overrides.items():
        setattr(config, key, value)
    trainer = SAETrainer(D_MODEL, config)
    fit_normalization(trainer.sae, data.sample(4096))
    return trainer


def train(trainer: SAETrainer, data: Planted, steps: int) -> None:
    for _ in range(steps):
        trainer.step(trainer.sae.normalize(data.sample(BATCH)))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These SAEs are tiny: one thread avoids thread-pool waits when the CPU is shared."""
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n_threads)


@pytest.fixture(scope="module")
def trained():
    data = Planted(seed=0)
    trainer = make_trainer(data)
    train(trainer, data, 1000)
    return data, trainer


def test_recovers_planted_directions(trained):
    data, trainer = trained
    heldout = data.sample(4096)
    metrics = evaluate_sae(trainer.sae, heldout)
    assert metrics["fve"] > 0.9
    W = trainer.sae.decoder.weight
    best_cos = (data.dirs @ W).max(dim=1).values  # decoder columns are unit norm
    assert (best_cos > 0.9).float().mean() > 0.8
    # The per-token threshold used at inference keeps about k latents per token, like training.
    assert abs(metrics["l0"] - K) / K < 0.25
    assert torch.allclose(W.norm(dim=0), torch.ones(W.shape[1]), atol=1e-5)


@pytest.mark.parametrize("l1", [0.0, 0.05])
def test_sparse_gradients_match_autograd_of_reference_loss(l1):
    """The hand-written step equals autograd through dictionary_learning's dense loss (MSE + aux-k), plus
    the L1 tie-break on the codes when it is on."""
    torch.manual_seed(0)
    trainer = SAETrainer(16, SAETrainConfig(k=3, dict_size=64, warmup_steps=0, lr=1e-3, dead_tokens=10**9, l1=l1))
    trainer.step(torch.randn(48, 16) * 3)
    trainer.tokens_since_fired[:20] = 10**9  # these are dead unless they fire on the next batch
    ae = copy.deepcopy(trainer.sae)
    x = torch.randn(48, 16) * 3

    acts = torch.relu(ae.encoder(x - ae.b_dec))
    top = acts.flatten().topk(3 * 48)
    f = torch.zeros(acts.numel()).scatter(0, top.indices, top.values).view_as(acts)
    err = x - (ae.decoder(f) + ae.b_dec)
    since_fired = trainer.tokens_since_fired + 48
    since_fired[f.sum(0) > 0] = 0
    dead = since_fired >= 10**9
    aux_top = torch.where(dead[None], acts, -torch.inf).topk(min(8, int(dead.sum())))
    aux_codes = torch.zeros_like(acts).scatter(1, aux_top.indices, aux_top.values)
    e = err.detach()
    auxk = (e - ae.decoder(aux_codes)).pow(2).sum(1).mean() / (e - e.mean(0)).pow(2).sum(1).mean()
    (err.pow(2).sum(1).mean() + auxk / 32 + l1 * float(ae.target_rms) * f.sum() / 48).backward()
    unit = ae.decoder.weight / (ae.decoder.weight.norm(dim=0, keepdim=True) + 1e-6)
    ae.decoder.weight.grad -= (ae.decoder.weight.grad * unit).sum(0, keepdim=True) * unit

    captured = {}
    clip = torch.nn.utils.clip_grad_norm_

    def capture(params, max_norm):
        params = list(params)
        captured.update({id(p): p.grad.clone() for p in params})
        return clip(params, max_norm)

    sae = trainer.sae

    torch.nn.utils.clip_grad_norm_ = capture
    try:
        out = trainer.step(x)
    finally:
        torch.nn.utils.clip_grad_norm_ = clip
    assert dead.sum() > 0 and out["auxk"] == pytest.approx(auxk.item(), rel=1e-5)
    ours = {
        "encoder.weight": captured[id(sae.encoder.weight)],
        "encoder.bias": captured[id(sae.encoder.bias)],
        "decoder.weight": captured[id(trainer.decoder_rows)].T,  # the optimiser's [F, D] view
        "b_dec": captured[id(sae.b_dec)],
    }
    for name, ref in ae.named_parameters():
        torch.testing.assert_close(ours[name], ref.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_merging_folds_latents_of_one_direction_into_one():
    """Three latents along one decoder direction become one whose code is their sum: the same
    reconstruction from one latent, and the other two freed (new directions, counted dead)."""
    torch.manual_seed(0)
    trainer = SAETrainer(16, SAETrainConfig(k=64, dict_size=64, dead_tokens=10**9, merge_cosine=0.99))
    sae = trainer.sae
    with torch.no_grad():
        trainer.decoder_rows[[1, 2]] = trainer.decoder_rows[0].clone()
        sae.encoder.weight[1] = 0.5 * sae.encoder.weight[0]
        sae.encoder.weight[2] = 2.0 * sae.encoder.weight[0]
        sae.encoder.bias[:3] = torch.tensor([0.1, 0.2, 0.3])
    x = torch.randn(32, 16)
    x = x[sae.pre_activations(x)[:, 0] > 0]  # where the three fire
    before = sae.decode(sae.encode(x, use_threshold=False))
    assert trainer.merge_duplicates() == 2
    codes = sae.encode(x, use_threshold=False)
    codes[:, [1, 2]] = 0
    torch.testing.assert_close(sae.decode(codes), before, rtol=1e-5, atol=1e-5)
    assert (trainer.decoder_rows[[1, 2]] @ trainer.decoder_rows[0]).abs().max() < 0.99
    assert trainer.n_dead == 2 and trainer.merge_duplicates() == 0


def test_auxk_revives_dead_latents():
    """Latents pushed out of every top-k (weak random encoder rows, useless decoder columns) get
    gradient only from aux-k: with it most fire again, without it none do."""
    data = Planted(seed=2)
    base = make_trainer(data, expansion=2)  # as many latents as planted directions: each one is needed
    train(base, data, 600)
    killed = torch.arange(0, base.sae.dict_size, 8)
    revived = {}
    for alpha in (1 / 32, 0.0):
        trainer = make_trainer(data, expansion=2, auxk_alpha=alpha, dead_tokens=2 * BATCH)
        trainer.load_state_dict(copy.deepcopy(base.state_dict()))
        sae, gen = trainer.sae, torch.Generator().manual_seed(1)
        with torch.no_grad():
            sae.encoder.weight[killed] = 0.1 * F.normalize(torch.randn(len(killed), D_MODEL, generator=gen), dim=1)
            sae.encoder.bias[killed] = 0
            sae.decoder.weight[:, killed] = F.normalize(torch.randn(D_MODEL, len(killed), generator=gen), dim=0)
            # A latent silent for long has no Adam moments left; clear them rather than wait ~1/(1-beta2) steps.
            state = trainer.optimizer.state
            for moment in ("exp_avg", "exp_avg_sq"):
                state[sae.encoder.weight][moment][killed] = 0
                state[sae.encoder.bias][moment][killed] = 0
                state[trainer.decoder_rows][moment][killed] = 0  # the optimiser sees the decoder as [F, D]
        trainer.tokens_since_fired[killed] = trainer.config.dead_tokens
        train(trainer, data, 150)
        with torch.no_grad():
            f = sae.encode_raw(data.sample(4096))
        revived[alpha] = int((f[:, killed] > 0).any(0).sum())
    assert revived[0.0] == 0
    assert revived[1 / 32] >= len(killed) // 2


def test_resume_is_bitwise_identical():
    data_a, data_b = Planted(seed=3), Planted(seed=3)
    overrides = dict(threshold_start_step=5, dead_tokens=BATCH, warmup_steps=4, steps=40, decay_start=20)
    straight = make_trainer(data_a, **overrides)
    train(straight, data_a, 30)

    first = make_trainer(data_b, **overrides)
    train(first, data_b, 15)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = make_trainer(Planted(seed=99), **overrides)  # different init and normalisation: all overwritten
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    train(resumed, data_b, 15)

    assert resumed.step_count == straight.step_count == 30
    assert float(straight.sae.threshold) > 0 and straight.n_dead > 0  # both mechanisms were exercised
    for name, value in straight.sae.state_dict().items():
        assert torch.equal(value, resumed.sae.state_dict()[name]), name
    assert torch.equal(straight.tokens_since_fired, resumed.tokens_since_fired)


def test_evaluation_does_not_touch_training_state(trained):
    data, base = trained
    a = make_trainer(data, threshold_start_step=0, dead_tokens=BATCH)
    a.load_state_dict(copy.deepcopy(base.state_dict()))
    b = copy.deepcopy(a)
    batches = [a.sae.normalize(data.sample(BATCH)) for _ in range(5)]
    heldout = data.sample(1000)
    for x in batches:
        before = copy.deepcopy(b.state_dict())
        evaluate_sae(b.sae, heldout, {"is_fire_token": torch.arange(1000) % 7 == 0}, chunk_size=300)
        b.sae.encode(x, use_threshold=False)
        after = b.state_dict()
        for name, value in before["sae"].items():
            assert torch.equal(value, after["sae"][name]), name
        assert torch.equal(before["tokens_since_fired"], after["tokens_since_fired"])
        a.step(x)
        b.step(x)
    for name, value in a.sae.state_dict().items():
        assert torch.equal(value, b.sae.state_dict()[name]), name


def test_metrics_subsets_and_table(trained):
    data, trainer = trained
    x = data.sample(2000)
    fire = torch.zeros(2000, dtype=torch.bool)
    fire[:50] = True
    metrics = evaluate_sae(trainer.sae, x, {"is_fire_token": fire}, chunk_size=512)
    assert set(metrics["fve_by_subset"]) == {"fire", "top1pct", "all", "bottom50pct"}
    assert metrics["subset_tokens"] == {"fire": 50, "top1pct": 20, "all": 2000, "bottom50pct": 1000}
    assert metrics["fve_by_subset"]["all"] == pytest.approx(metrics["fve"])
    # The chunked float64 sums equal the one-shot definition.
    with torch.no_grad():
        x_hat = trainer.sae.reconstruct_raw(x)
    direct = 1 - (x - x_hat).var(0).sum() / x.var(0).sum()
    assert metrics["fve"] == pytest.approx(float(direct), abs=1e-4)
    assert 0 <= metrics["dead"] < 1
    no_fire = evaluate_sae(trainer.sae, x, {"is_fire_token": torch.zeros(2000, dtype=torch.bool)})
    assert "fire" not in no_fire["fve_by_subset"]

    table = format_metrics_table([{"layer": 9, "k": K, **metrics}, {"layer": 16, "k": K, **no_fire}])
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["layer", "k", "fve"] and "fve[fire]" in lines[0]
    assert len(lines) == 4 and lines[3].split()[0] == "16" and "-" in lines[3].split()


def test_normalization_and_raw_direction():
    data = Planted(seed=5)
    sae = BatchTopKSAE(D_MODEL, 4 * D_MODEL, K)
    x = data.sample(3000)
    fit_normalization(sae, x, target_rms=100.0)
    x_n = sae.normalize(x)
    assert x_n.mean(0).abs().max() < 1e-3
    assert x_n.pow(2).sum(1).mean().sqrt() == pytest.approx(100.0, rel=1e-3)
    torch.testing.assert_close(sae.denormalize(x_n), x, rtol=1e-5, atol=1e-3)
    with torch.no_grad():
        sae.threshold.fill_(0.0)
        f = sae.encode_raw(x[:10])
        j = int(f.sum(0).argmax())
        ablated = f.clone()
        ablated[:, j] = 0
        expected = sae.denormalize(sae.decode(ablated))
        got = sae.reconstruct_raw(x[:10]) - f[:, j : j + 1] * sae.raw_direction(j)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("shape,n_keep", [((2048, 1024), 64 * 2048), ((64, 100), 300), ((300, 500), 300 * 500)])
def test_batch_topk_is_exact(shape, n_keep):
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(shape, generator=gen)
    got, values = batch_topk(scores, n_keep)
    want = scores.flatten().topk(min(n_keep, scores.numel())).indices.sort().values
    assert torch.equal(got, want) and torch.equal(values, scores.flatten()[want])
    ties = torch.zeros(2048, 1024)  # every value tied: the sampled shortcut must fall back, still exact in count
    assert batch_topk(ties, 64 * 2048)[0].unique().numel() == 64 * 2048


def test_geometric_median_resists_outliers():
    points = torch.cat([torch.randn(200, 3) * 0.1, torch.full((20, 3), 100.0)])
    assert geometric_median(points).norm() < 1.0
    assert points.mean(0).norm() > 10
