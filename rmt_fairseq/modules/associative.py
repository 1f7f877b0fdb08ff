"""Associative memory of ARMT: one matrix per layer, written by the memory tokens, read by every token of the next
segment (Rodkin, Kuratov, Bulatov, Burtsev 2024, "Associative Recurrent Memory Transformer", arXiv 2407.04841,
§3 eqs. 1-5; the authors' AssociativeLayerWrapper in RodkinIvan/associative-recurrent-memory-transformer).

Legend: B batch (streams), N query rows of a segment (T tokens + M memory tokens), M memory tokens, C model dim,
D --d-mem, F = 2 nu D the DPFP feature dimension (nu = --dpfp-nu).

Per layer l, with A_l (B x F x C) and z_l (B x F) the layer's associative state (zero at a stream's start):

  read (every row x of the layer's input, before the layer):      x <- x + A_l^T phi(q) / max(z_l . phi(q) + eps, f)
        q = W_Q x                                                   (eq. 5)
  write (the layer's output at the M memory-token rows m_j):
        k_j = W_K m_j,  v_j = W_V m_j,  beta_j = sigmoid(w_b . m_j + b_b)
        vbar_j = A_l^T phi(k_j) / max(z_l . phi(k_j) + eps, f)    the value already stored at k_j (0 at the start)
        gamma_j = clip(1 - (z_l . phi(k_j) + eps) / |phi(k_j)|^2, 0, 1), not differentiated   (correction term)
        A_l <- A_l + sum_j beta_j phi(k_j) (v_j - vbar_j)^T        (delta rule, eq. 3)
        z_l <- z_l + sum_j gamma_j phi(k_j)                        (eq. 4; gamma_j = 1 at the stream's start)
  --associative-write: "parallel" computes every vbar_j, gamma_j against the state before the segment and adds the
  sums (the authors' code); "sequential" (the default) applies the two lines to one memory token after another, so
  token j's vbar_j and gamma_j see what tokens 1..j-1 wrote (the delta rule as Schlag et al. 2021 write it, token
  by token). Where the M keys' features do not overlap the two agree. Where they do, the parallel write corrects
  the same stored value M times: along a key the memory holds (z . phi(k) ~ 1, gamma 0) the stored value is scaled
  by 1 - sum_j beta_j each segment, |1 - M| > 1 for M > 2 memory tokens with beta ~ 1, and the matrix grows
  geometrically (armt_tiny on never-restarted --task rmt_lm streams: max |A| 2 -> 4e17 in 30 updates, then a
  non-finite loss). Token by token, a key's first write brings z . phi(k) to about 1 (gamma) and each later write
  scales the stored value by 1 - beta_j, in (0, 1): a rewrite replaces the value rather than overshooting it
  (tests/modules/test_associative_rules.py).

f = DEN_FLOOR (1e-2) keeps the read bounded where z . phi(q) = 0 but A . phi(q) != 0 (see DEN_FLOOR); the paper's
denominator is z . phi + eps, which the floor leaves unchanged wherever it is >= f.

phi is DPFP with nu (Schlag et al. 2021): [relu(x), relu(-x)] (2D) times its 1..nu rolls, F = 2 nu D values, then
L2-normalised as in the authors' code (|phi|^2 = 1, so the normaliser ratio is unchanged and eps is relative).

W_V starts at zero, so the state stays zero and every read adds exactly 0: a model with the flag on computes what
it computed without it until W_V learns (a pretrained transformer_lm wrapped with it is unchanged).

The state is accumulated in --associative-state-dtype (fp32 by default, also under --bf16/--fp16): projections
run in the model's dtype, phi, the update and the read in the state's dtype, the read is cast back.
"""

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-5  # the authors' denominator epsilon
# The read's and vbar's denominator z . phi + eps is floored here. The paper's formula divides by eps where the
# normaliser z has not seen the query's features (z . phi(q) = 0) while A has (keys written with gamma = 0 leave A's
# support wider than z's): a read of |A^T phi(q)| / 1e-5, about 2e4 in the memorization run, whose backward went
# non-finite at lr 1e-3 (issue 29). With unit-norm features and z the sum of the written ones, z . phi is O(1)
# wherever the memory knows the query; the floor bounds the read by |A^T phi(q)| / DEN_FLOOR and leaves the formula
# unchanged wherever z . phi(q) + eps >= DEN_FLOOR. gamma (the correction term) keeps the unfloored denominator.
DEN_FLOOR = 1e-2
STATE_DTYPES = {"fp32": torch.float32, "model": None}  # None: the model's own dtype
WRITE_RULES = ("sequential", "parallel")  # --associative-write (update's docstring); the first is the default


def dpfp(x: torch.Tensor, nu: int) -> torch.Tensor:
    """Deterministic parameter-free projection (Schlag, Irie, Schmidhuber 2021, eq. 11): ... x D -> ... x 2 nu D."""
    x = torch.cat([F.relu(x), F.relu(-x)], dim=-1)  # ... x 2D
    rolled = torch.cat([x.roll(shifts=j, dims=-1) for j in range(1, nu + 1)], dim=-1)  # ... x 2 nu D
    return x.repeat(*([1] * (x.dim() - 1)), nu) * rolled


def feature(x: torch.Tensor, nu: int) -> torch.Tensor:
    """phi of the module docstring: DPFP then L2 normalisation over the last dim."""
    return F.normalize(dpfp(x, nu), dim=-1, p=2.0)


class AssociativeMemory(nn.Module):
    """The associative block of one layer (module docstring): projections W_Q, W_K (C -> D), W_V (C -> C, zero at
    the start) and the write gate w_b (C -> 1). The state (A, z) is data passed in and returned, never kept."""

    def __init__(self, embed_dim: int, d_mem: int, nu: int = 3, write_rule: str = WRITE_RULES[0]):
        super().__init__()
        if write_rule not in WRITE_RULES:
            raise ValueError(f"associative write rule must be one of {WRITE_RULES}, got {write_rule!r}")
        self.d_mem, self.nu, self.write_rule = d_mem, nu, write_rule
        self.q_proj = nn.Linear(embed_dim, d_mem, bias=False)
        self.k_proj = nn.Linear(embed_dim, d_mem, bias=False)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=False)
        self.beta_proj = nn.Linear(embed_dim, 1)
        nn.init.zeros_(self.v_proj.weight)

    @property
    def feature_dim(self) -> int:
        return 2 * self.nu * self.d_mem

    def read(self, x: torch.Tensor, A: Optional[torch.Tensor], z: Optional[torch.Tensor],
             state_dtype: Optional[torch.dtype]) -> torch.Tensor:
        """x B x N x C -> x + A^T phi(q) / (z . phi(q) + eps) (B x N x C, x's dtype). A None (the stream's first
        segment) reads zeros; W_Q still runs so that every rank uses every parameter in every step."""
        mq = feature(project(x, self.q_proj.weight).to(state_dtype or x.dtype), self.nu)  # B x N x F
        return read(x, mq, A, z)

    def write(self, mem: torch.Tensor, A: Optional[torch.Tensor], z: Optional[torch.Tensor],
              state_dtype: Optional[torch.dtype]) -> Tuple[torch.Tensor, torch.Tensor]:
        """mem B x M x C (the layer's output at the memory-token rows) -> the new (A B x F x C, z B x F) in the
        state dtype. A None: the stream's first segment (nothing stored: vbar 0, gamma 1)."""
        dt = state_dtype or mem.dtype
        mk = feature(project(mem, self.k_proj.weight).to(dt), self.nu)  # B x M x F
        v = project(mem, self.v_proj.weight).to(dt)  # B x M x C
        beta = gate(mem, self.beta_proj.weight[0], self.beta_proj.bias).to(dt)  # B x M x 1
        return update(mk, v, beta, A, z, self.write_rule)


def gate(mem: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The write gate sigmoid(w . m + b): mem ... x M x C, w (...) x C, b (...) x 1 -> ... x M x 1. A product and a
    row sum rather than a 1-column Linear, so that every schedule rounds alike (a 1-column addmm does not)."""
    return torch.sigmoid((mem * w.unsqueeze(-2)).sum(-1, keepdim=True) + b.unsqueeze(-2))


def project(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x ... x n x C_in times w^T, w (...) x C_out x C_in broadcast over x's leading dims -> ... x n x C_out: one bmm
    per stream, so that the diagonal schedule (layers x streams) rounds as the sequential one (streams)."""
    w = w.expand(*x.shape[:-2], *w.shape[-2:])
    return _bmm(x, w.transpose(-1, -2))


def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a ... x n x k @ b ... x k x m as one bmm over the flattened leading dims: the same kernel call per matrix
    whatever the leading dims, so the diagonal schedule (layers x streams) rounds as the sequential one (streams)."""
    lead = a.shape[:-2]
    out = torch.bmm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]))
    return out.view(*lead, *out.shape[-2:])


def read(x: torch.Tensor, mq: torch.Tensor, A: Optional[torch.Tensor], z: Optional[torch.Tensor]) -> torch.Tensor:
    """The read of the module docstring for any leading dims (...): x ... x N x C, mq = phi(q) ... x N x F,
    A ... x F x C, z ... x F -> x + the read, in x's dtype. A None: x plus 0 x mq (exact; keeps W_Q in the graph)."""
    if A is None:
        return x + 0.0 * mq.sum(-1, keepdim=True).to(x.dtype)
    num = _bmm(mq, A)  # ... x N x C
    den = (_bmm(mq, z.unsqueeze(-1)) + EPS).clamp_min(DEN_FLOOR)  # ... x N x 1
    return x + (num / den).to(x.dtype)


def update(mk: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, A: Optional[torch.Tensor],
           z: Optional[torch.Tensor], rule: str = WRITE_RULES[0]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The write of the module docstring for any leading dims (...): mk = phi(k) ... x M x F, v ... x M x C, beta
    ... x M x 1 (all in the state dtype), A ... x F x C and z ... x F or None (a stream's start) -> new (A, z).
    `rule` (WRITE_RULES): "parallel" writes the M memory tokens at once, each against the state before the segment
    (the authors' code); "sequential" writes them one after another, each against the state the ones before it
    left (the delta rule token by token, as Schlag et al. 2021 write it)."""
    if rule == "parallel":
        return _write(mk, v, beta, A, z)
    for j in range(mk.size(-2)):  # sequential (AssociativeMemory checks the rule once, when built)
        A, z = _write(mk[..., j : j + 1, :], v[..., j : j + 1, :], beta[..., j : j + 1, :], A, z)
    return A, z


def _write(mk, v, beta, A, z):
    """The paper's write (eqs. 3-4) of the rows of mk at once, each against (A, z) as given (None: zeros, with vbar 0
    and gamma 1 as at a stream's start)."""
    if A is None:
        delta, gamma = v, 1.0
        A = mk.new_zeros(*mk.shape[:-2], mk.size(-1), v.size(-1))
        z = mk.new_zeros(*mk.shape[:-2], mk.size(-1))
    else:
        den = _bmm(mk, z.unsqueeze(-1)) + EPS  # ... x M x 1
        delta = v - _bmm(mk, A) / den.clamp_min(DEN_FLOOR)  # ... x M x C: v_j - vbar_j
        gamma = (1 - den / mk.pow(2).sum(-1, keepdim=True)).clamp(0, 1).detach()  # ... x M x 1
    A = A + _bmm((beta * mk).transpose(-1, -2).contiguous(), delta)  # ... x F x C
    z = z + (gamma * mk).sum(-2)  # ... x F
    return A, z


AssocState = Optional[List[torch.Tensor]]  # [A_0, z_0, A_1, z_1, ...] per layer, or None at a stream's start


def layer_state(assoc: AssocState, layer: int) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(A_l, z_l) of the flat per-layer list, (None, None) at a stream's start."""
    if assoc is None:
        return None, None
    return assoc[2 * layer], assoc[2 * layer + 1]


def read_layers(blocks, x: torch.Tensor, assoc: AssocState, state_dtype: Optional[torch.dtype]):
    """The diagonal schedule's read for G layers, one block call each as in the sequential forward (in fp32 a bmm
    over G x B matrices rounds differently from one over B, and the read amplifies that from segment to segment):
    blocks G AssociativeMemory, x G x B x N x C, assoc [A G x B x F x C, z G x B x F] or None -> (x after the read,
    the G per-layer (A, z) for write_layers)."""
    states = [(assoc[0][g], assoc[1][g]) if assoc is not None else (None, None) for g in range(len(blocks))]
    return torch.stack([b.read(x[g], *states[g], state_dtype) for g, b in enumerate(blocks)]), states


def write_layers(blocks, mem: torch.Tensor, states, state_dtype: Optional[torch.dtype]) -> List[torch.Tensor]:
    """The diagonal schedule's write for G layers (read_layers' calls' counterpart): mem G x B x M x C, the layers'
    memory-token rows -> [A G x B x F x C, z G x B x F]."""
    pairs = [b.write(mem[g], *states[g], state_dtype) for g, b in enumerate(blocks)]
    return [torch.stack([A for A, _ in pairs]), torch.stack([z for _, z in pairs])]


def state_dtype(name: str) -> Optional[torch.dtype]:
    return STATE_DTYPES[str(name)]
