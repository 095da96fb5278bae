"""One BatchTopK SAE's optimisation: loss, hand-written sparse gradients, Adam, threshold, dead latents.

The objective is dictionary_learning's BatchTopKTrainer (MSE + aux-k/32, decoder-parallel
gradient removed, grad-norm clip 1, Adam, unit-norm decoder columns, EMA threshold), but the
step never builds the dense B×F code matrix or runs autograd over it. Only about k of F latents
fire per token, so after the one dense encoder product everything is computed on the selected
(token, latent) pairs:

    decode             x̂_r  = b_dec + Σ_c v_rc W_dec[:, c]            embedding_bag over each token's latents
    code gradient      ∂v_rc = g_r · W_dec[:, c]                     sampled matrix product at the selected pairs
    weight gradients   ∂W_dec[:, c] = Σ_r v_rc g_r,  ∂W_enc[c] = Σ_r ∂a_rc (x_r − b_dec)
                                                                     embedding_bag over each latent's tokens

with g = ∂loss/∂x̂. The aux-k term only touches dead latents and is done densely on that
(small) column block. Nothing in `step` reads the SAE for evaluation, and evaluation
(diffkit.metrics) never calls `step`, so measuring a model cannot move its threshold or its
dead-latent counters.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from diffkit.errors import DiffkitError
from diffkit.sae import BatchTopKSAE, batch_topk


@dataclass
class SAETrainConfig:
    k: int = 64
    expansion: int = 4                    # dict_size = expansion * activation_dim unless dict_size is set
    dict_size: int | None = None
    lr: float | None = None               # None: 2e-4 / sqrt(dict_size / 2**14)
    steps: int | None = None              # total steps; needed only for a linear decay
    warmup_steps: int = 1000
    decay_start: int | None = None        # None: constant learning rate after warm-up
    auxk_alpha: float = 1 / 32
    l1: float = 0.0                       # L1 on the codes, × target_rms per unit of code; 0 is the reference objective
    merge_every: int = 0                  # fold latents with the same decoder direction every this many steps (0: never)
    merge_cosine: float = 0.99            # decoder cosine at which two latents are one direction
    dead_tokens: int = 10_000_000         # a latent silent for this many tokens is dead (aux-k revives it)
    threshold_start_step: int = 1000
    threshold_beta: float = 0.999
    seed: int = 0

    def resolved_dict_size(self, activation_dim: int) -> int:
        return self.dict_size if self.dict_size is not None else self.expansion * activation_dim

    def resolved_lr(self, dict_size: int) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(dict_size / 2**14)

    def lr_factor(self, step: int) -> float:
        """Linear warm-up from 0, then constant, or a linear decay to 0 from `decay_start` to `steps`."""
        if step < self.warmup_steps:
            return step / self.warmup_steps
        if self.decay_start is not None and step >= self.decay_start:
            return max(0.0, (self.steps - step) / (self.steps - self.decay_start))
        return 1.0

    def validate(self) -> None:
        if self.l1 < 0:
            raise DiffkitError(f"l1 must be 0 or positive, got {self.l1}")
        if self.k < 1:
            raise DiffkitError(f"k must be positive, got {self.k}")
        if self.decay_start is not None:
            if self.steps is None:
                raise DiffkitError("decay_start needs steps (the step the learning rate reaches 0)")
            if not self.warmup_steps <= self.decay_start < self.steps:
                raise DiffkitError(
                    f"need warmup_steps <= decay_start < steps, got {self.warmup_steps}, {self.decay_start}, {self.steps}"
                )


class SAETrainer:
    """Trains one BatchTopK SAE on normalised vectors: `metrics = trainer.step(sae.normalize(x_raw))`.

    The trainer owns its SAE: pick the device here (moving `trainer.sae` afterwards would leave
    the optimiser updating the old copy), checkpoint with `state_dict()`.
    """

    def __init__(
        self,
        activation_dim: int,
        config: SAETrainConfig,
        device: str | torch.device = "cpu",
        sae: BatchTopKSAE | None = None,
    ):
        config.validate()
        self.config = config
        dict_size = config.resolved_dict_size(activation_dim)
        if sae is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                sae = BatchTopKSAE(activation_dim, dict_size, config.k)
        if (sae.activation_dim, sae.dict_size, int(sae.k)) != (activation_dim, dict_size, config.k):
            raise DiffkitError("the SAE given to SAETrainer does not match its config")
        self.sae = sae.to(device)
        decoder = self.sae.decoder
        if not decoder.weight.T.is_contiguous():  # latent-major, as BatchTopKSAE makes it
            decoder.weight = torch.nn.Parameter(decoder.weight.detach().T.contiguous().T)
        # The optimiser updates the decoder through a [F, D] alias of its storage: every tensor it
        # sees is contiguous, so fused Adam (one pass per tensor, several times faster than the
        # default on CPU) never copies the decoder back and forth.
        self.decoder_rows = decoder.weight.detach().T
        self.params = [self.sae.encoder.weight, self.sae.encoder.bias, self.decoder_rows, self.sae.b_dec]
        self.base_lr = config.resolved_lr(dict_size)
        self.optimizer = torch.optim.Adam(self.params, lr=self.base_lr, betas=(0.9, 0.999), fused=True)
        self.step_count = 0
        self.tokens_since_fired = torch.zeros(dict_size, dtype=torch.long, device=self.sae.b_dec.device)
        self.k_aux = activation_dim // 2

    @property
    def n_dead(self) -> int:
        return int((self.tokens_since_fired >= self.config.dead_tokens).sum())

    @torch.no_grad()
    def step(self, x: torch.Tensor) -> dict[str, float]:
        """One optimisation step on a batch `[B, D]` of normalised vectors; returns the batch's
        loss, mse (per token, summed over D), auxk, fve and l0."""
        sae, cfg = self.sae, self.config
        x = x.to(device=sae.b_dec.device, dtype=torch.float32)
        if self.step_count == 0:
            sae.b_dec.copy_(geometric_median(x))
        W_enc, b_enc = sae.encoder.weight, sae.encoder.bias
        W_dec_rows, b_dec = self.decoder_rows, sae.b_dec
        n_tokens, n_latents = x.shape[0], sae.dict_size

        # Encode: the only dense B×F product of the step, then the batch top-k on it.
        x_centred = x - b_dec
        pre = torch.addmm(b_enc, x_centred, W_enc.T)
        flat_idx, pre_sel = batch_topk(pre, cfg.k * n_tokens)  # ascending: grouped by token
        rows, cols = flat_idx // n_latents, flat_idx % n_latents
        v = pre_sel.clamp_min(0)

        # Decode as a weighted bag of decoder rows per token.
        token_offsets = _offsets(rows, n_tokens)
        x_hat = F.embedding_bag(cols, W_dec_rows, token_offsets, mode="sum", per_sample_weights=v) + b_dec
        err = x - x_hat
        mse = torch.linalg.vector_norm(err) ** 2 / n_tokens

        # Dead-latent bookkeeping (before aux-k, as in the reference trainer).
        fired = torch.zeros(n_latents, device=x.device).index_add_(0, cols, (v > 0).float()) > 0
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired.masked_fill_(fired, 0)
        if self.step_count > cfg.threshold_start_step:
            self._update_threshold(v)

        # Gradients of the MSE term on the selected pairs, regrouped by latent (the order the
        # weight gradients accumulate in; it also makes the sampled product read contiguous rows).
        g = err * (-2.0 / n_tokens)                           # ∂mse/∂x̂
        # Sorting a [1, n] view takes the comparison sort: torch's parallel radix sort for 1-D
        # integers is faster on an idle CPU but stalls for hundreds of ms on a busy one.
        order = torch.argsort(cols.view(1, -1), dim=1, stable=True).view(-1)
        rows_by_latent, v_by_latent = rows[order], v[order]
        latent_counts = torch.bincount(cols, minlength=n_latents)
        latent_offsets = torch.cumsum(latent_counts, 0) - latent_counts
        d_v = _sampled_dot(W_dec_rows, g, latent_offsets, rows_by_latent, n_tokens)
        l1_weight = cfg.l1 * float(sae.target_rms) / n_tokens  # ∂(l1 term)/∂v for every selected code
        if l1_weight:
            d_v += l1_weight
        d_pre = d_v * (v_by_latent > 0)  # relu's gradient (v = relu(pre))
        grad_W_dec_rows = F.embedding_bag(rows_by_latent, g, latent_offsets, mode="sum", per_sample_weights=v_by_latent)
        grad_W_enc = F.embedding_bag(rows_by_latent, x_centred, latent_offsets, mode="sum", per_sample_weights=d_pre)
        grad_b_enc = torch.segment_reduce(d_pre, "sum", lengths=latent_counts)

        auxk = self._auxk(err, pre, x_centred, W_dec_rows, grad_W_dec_rows, grad_W_enc, grad_b_enc)
        grad_b_dec = g.sum(0) - grad_b_enc @ W_enc

        # Constrained Adam step: no gradient along decoder directions, clipped norm, unit directions after.
        parallel = torch.bmm(grad_W_dec_rows.unsqueeze(1), W_dec_rows.unsqueeze(2)).view(-1)
        parallel /= (W_dec_rows.norm(dim=1) + 1e-6) ** 2
        grad_W_dec_rows.addcmul_(parallel[:, None], W_dec_rows, value=-1)
        for param, grad in zip(self.params, (grad_W_enc, grad_b_enc, grad_W_dec_rows, grad_b_dec)):
            param.grad = grad
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        for group in self.optimizer.param_groups:
            group["lr"] = self.base_lr * cfg.lr_factor(self.step_count)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        W_dec_rows /= W_dec_rows.norm(dim=1, keepdim=True) + torch.finfo(W_dec_rows.dtype).eps
        self.step_count += 1
        if cfg.merge_every and self.step_count % cfg.merge_every == 0 and self.step_count < (cfg.steps or math.inf):
            self.merge_duplicates()

        fve = 1 - err.var(0, correction=0).sum() / x.var(0, correction=0).sum()
        l0 = (v > 0).sum() / n_tokens
        loss = mse + cfg.auxk_alpha * auxk + l1_weight * v.sum()
        values = torch.stack([loss, mse, auxk, fve, l0.float()]).tolist()
        return dict(zip(("loss", "mse", "auxk", "fve", "l0"), values))

    @torch.no_grad()
    def merge_duplicates(self) -> int:
        """Fold each group of live latents whose decoder directions agree to `merge_cosine` into its first
        latent and free the rest; returns how many were freed.

        Latents that share a direction fire together, so one latent whose encoder row and bias are their
        sums gives the same reconstruction wherever they all fire. The freed latents restart from random
        unit directions with their optimiser state cleared and count as dead, so aux-k puts them to use.
        With the L1 tie-break the duplicates do not come back: a second latent along a direction already
        reconstructed lowers no error and costs L1."""
        sae, cfg = self.sae, self.config
        rows, W_enc, b_enc = self.decoder_rows, sae.encoder.weight, sae.encoder.bias
        live = (self.tokens_since_fired < cfg.dead_tokens).nonzero().squeeze(1)
        freed = torch.zeros(sae.dict_size, dtype=torch.bool, device=rows.device)
        for start in range(0, live.numel(), 1024):
            block = live[start:start + 1024]
            cosine = rows[block] @ rows[live].T  # [block, live]
            for i, latent in enumerate(block.tolist()):
                if freed[latent]:
                    continue
                same = live[(cosine[i] >= cfg.merge_cosine) & ~freed[live]]
                same = same[same > latent]
                if same.numel():
                    W_enc[latent] += W_enc[same].sum(0)
                    b_enc[latent] += b_enc[same].sum()
                    freed[same] = True
        gone = freed.nonzero().squeeze(1)
        if gone.numel():
            generator = torch.Generator(device="cpu").manual_seed(cfg.seed + self.step_count)
            fresh = torch.randn(gone.numel(), sae.activation_dim, generator=generator).to(rows)
            rows[gone] = fresh / fresh.norm(dim=1, keepdim=True)
            W_enc[gone] = rows[gone]
            b_enc[gone] = 0
            for param in self.params[:3]:  # encoder weight and bias, decoder rows: latent-major
                for moment in self.optimizer.state[param].values():
                    if moment.dim() and moment.shape[0] == sae.dict_size:
                        moment[gone] = 0
            self.tokens_since_fired[gone] = cfg.dead_tokens
        return int(gone.numel())

    def _update_threshold(self, v: torch.Tensor) -> None:
        """EMA of the smallest positive code of the batch: the per-token cut used at inference."""
        smallest = torch.where(v > 0, v, torch.inf).min()
        smallest = torch.where(torch.isinf(smallest), torch.zeros_like(smallest), smallest)
        thr = self.sae.threshold
        beta = self.config.threshold_beta
        thr.copy_(torch.where(thr < 0, smallest, beta * thr + (1 - beta) * smallest))

    def _auxk(self, err, pre, x_centred, W_dec_rows, grad_W_dec_rows, grad_W_enc, grad_b_enc) -> torch.Tensor:
        """Aux-k: reconstruct the (detached) residual from the top `D/2` dead latents of each token,
        normalised by the residual's variance; adds its gradients in place. Returns the loss term."""
        dead = (self.tokens_since_fired >= self.config.dead_tokens).nonzero().squeeze(1)
        if dead.numel() == 0:
            return torch.zeros((), device=err.device)
        alpha = self.config.auxk_alpha
        k_aux = min(self.k_aux, dead.numel())
        n_tokens = err.shape[0]
        dead_acts = pre[:, dead].clamp_min(0)
        top = dead_acts.topk(k_aux, dim=1, sorted=False)
        codes = torch.zeros_like(dead_acts).scatter_(1, top.indices, top.values)
        W_dead = W_dec_rows[dead]
        residual = err - codes @ W_dead
        denom = (err - err.mean(0)).pow(2).sum(1).mean()
        auxk = residual.pow(2).sum(1).mean() / denom
        if not torch.isfinite(auxk):
            return torch.zeros((), device=err.device)
        h = residual * (-2.0 * alpha / (n_tokens * denom))    # ∂(α·auxk)/∂(aux reconstruction)
        grad_W_dec_rows[dead] += codes.T @ h
        d_pre = (h @ W_dead.T) * (codes > 0)
        grad_W_enc[dead] += d_pre.T @ x_centred
        grad_b_enc[dead] += d_pre.sum(0)
        return auxk

    # -- checkpoints -----------------------------------------------------------------------------

    def __deepcopy__(self, memo) -> "SAETrainer":
        """A copy trains exactly like the original (a plain deepcopy would cut the decoder alias)."""
        sae = copy.deepcopy(self.sae, memo)
        clone = SAETrainer(sae.activation_dim, copy.deepcopy(self.config), sae.b_dec.device, sae)
        clone.load_state_dict(copy.deepcopy(self.state_dict(), memo))
        return clone

    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue bit for bit (the SAE includes its threshold)."""
        return {
            "config": asdict(self.config),
            "sae": self.sae.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step_count,
            "tokens_since_fired": self.tokens_since_fired.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.sae.load_state_dict(state["sae"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_count = int(state["step"])
        self.tokens_since_fired.copy_(state["tokens_since_fired"])


def _offsets(sorted_ids: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Start of each group in an ascending id vector (the `offsets` of embedding_bag)."""
    counts = torch.bincount(sorted_ids, minlength=n_groups)
    return torch.cumsum(counts, 0) - counts


def _sampled_dot(W_dec_rows, g, latent_offsets, rows_by_latent, n_tokens) -> torch.Tensor:
    """`W_dec_rows[c] · g[r]` for every selected pair, in latent-major order, without forming B×F."""
    crow = torch.cat([latent_offsets, latent_offsets.new_tensor([rows_by_latent.numel()])])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sparse CSR is marked beta
        pattern = torch.sparse_csr_tensor(
            crow, rows_by_latent, g.new_ones(rows_by_latent.numel()), (W_dec_rows.shape[0], n_tokens), check_invariants=False
        )
        return torch.sparse.sampled_addmm(pattern, W_dec_rows, g.T, beta=0.0).values()


def geometric_median(points: torch.Tensor, max_iter: int = 100, tol: float = 1e-5) -> torch.Tensor:
    """Weiszfeld's iteration: the point minimising the summed distance to `points` [N, D]."""
    guess = points.mean(0)
    for _ in range(max_iter):
        dist = (points - guess).norm(dim=1).clamp_min(1e-12)
        weights = 1 / dist
        new = (weights[:, None] * points).sum(0) / weights.sum()
        if (new - guess).norm() < tol:
            return new
        guess = new
    return guess
