"""The memory scheme: one object per memory variant, owning the whole memory mechanism, that every family
(rmt_lm, rmt_transformer_lm, rmt_encoder), the segment loop's schedules (modules/recurrence.py) and generation call.

Legend: B streams, T segment tokens, M memory tokens, C model dim (of the memory rows), N rows of a segment,
G layers of one batched call (the diagonal schedule), F associative feature dim.

A family is "embed, run my layers, project": it asks its scheme for the memory rows to put around the segment
(`blocks`), calls `read` before and `write` after each layer, and hands the last layer's output to `carry` for the
memory the next segment reads. The scheme builds the modules it needs (`build`) and the family registers them under
the names the scheme gives (`memory`, `assoc_layers`, `memory_gate`: the checkpoints' parameter names).

Schemes (`scheme_from(cfg)` picks one from the flags; `LAYOUTS` are --memory-layout's choices):

  none   --mem-tokens 0                     nothing carried by tokens (an XL cache may still be)
  rmt    RMT (Bulatov et al. 2022, §3.2)    causal: [read M | segment T | write M], the same memory placed in both
                                            blocks; the write block's output is the next segment's read block.
                                            Bidirectional (the encoder; "Scaling Transformer to 1M tokens", §2):
                                            [memory M | segment T], the same slots read and written
  mt     the paper's MT ablation            [memory M | segment T]: learned tokens read, nothing written or carried
  gated  RMT with a gated write             rmt's rows; the next memory is z * w + (1 - z) * r, w the written rows,
                                            r the memory read, z = sigmoid(W_z [w; r] + b_z) per slot and channel
                                            (a GRU-style update gate: memory kept where z is small). W_z starts at
                                            zero and b_z at --memory-gate-bias (default 0), so z = sigmoid(b_z)
                                            (1/2 by default) before training. --memory-gate-input read: z =
                                            gate(W_z r + b_z), the memory read alone (a GRU update gate without
                                            its input term): a slot closed on every channel sees the same input
                                            next segment, so it stays closed and keeps its memory for good
  gated_hard the gated write, a hard gate       z = hardsigmoid(W_z [w; r] + b_z) = clamp(a / 6 + 1/2, 0, 1)
                                            (torch's): exactly 0 where a <= -3, so a slot the gate closes keeps its
                                            memory bit for bit over any number of segments (issue 29: a sigmoid
                                            gate only leaks slower); hardsigmoid(b_z) before training (1/2 by
                                            default; b_z = -2: 1/6)
  armt   ARMT (Rodkin et al. 2024)          causal: [segment T | memory M], bidirectional: [memory M | segment T];
                                            learned tokens, not carried; per layer an associative matrix read by
                                            every row before the layer and written by the memory rows after it
                                            (modules/associative.py)

The XL cache (--mem-len L, rmt_lm) combines with each (`update_cache`). `diagonal_exact`: the diagonal schedule
computes what the sequential one computes only when layer l of a segment needs layer l of the one before, never
its last layer: not so for schemes that carry token memory (rmt, gated).

Adding a variant: a subclass here, its name in LAYOUTS, and its presets in the families' preset tables.
"""

from typing import List, Optional, Tuple

import torch
from torch import nn

from rmt_fairseq.modules import associative
from rmt_fairseq.modules.memory import MemoryTokens

LAYOUTS = ("rmt", "mt", "gated", "gated_hard")  # --memory-layout (ARMT: --associative-memory on the rmt layout)
GATE_INPUTS = ("both", "read")  # --memory-gate-input: what the update gate of gated / gated_hard sees; first: default


class MemoryScheme:
    """No memory tokens. The base of every scheme: `M` memory tokens, `causal` (a decoder: memory written after
    the segment) or bidirectional (an encoder: written in its own slots), `mem_len` (the XL cache length, 0 none),
    `state_dtype` (ARMT's state dtype, None: the model's)."""

    name = "none"
    carries_tokens = False  # the written rows' output is the next segment's read block
    associative = False  # per-layer associative state (read before, written after each layer)

    def __init__(self, mem_tokens: int = 0, causal: bool = True, mem_len: int = 0,
                 state_dtype: Optional[torch.dtype] = None):
        self.M, self.causal, self.mem_len, self.state_dtype = int(mem_tokens), bool(causal), int(mem_len), state_dtype

    # ---- the modules it needs (registered on the family under these names) -----------------------------------

    # the modules the scheme needs, by the attribute names the family registers them under (the checkpoints'
    # parameter names); `memory` first: a family builds it where its parameters were always drawn, the others after
    modules: Tuple[str, ...] = ("memory",)

    def build(self, name: str, embed_dim: int, num_layers: int, cfg, init_std: float = 1.0) -> Optional[nn.Module]:
        """The module `name` of `modules` (None when the scheme has no use for it); `cfg` gives ARMT's d_mem, nu."""
        if name == "memory":
            return MemoryTokens(self.M, embed_dim, init_std) if self.M > 0 else None
        raise KeyError(name)

    # ---- the rows around the segment --------------------------------------------------------------------------

    @property
    def before(self) -> int:
        """Memory rows before the segment."""
        return 0

    @property
    def after(self) -> int:
        """Memory rows after the segment."""
        return 0

    def initial(self, owner, batch_size: int) -> Optional[torch.Tensor]:
        """The memory a stream starts with, B x M x C, for schemes that carry it (the segment loop adds it to every
        call's graph: modules/recurrence.py); None otherwise."""
        return owner.memory(batch_size) if self.carries_tokens else None

    def blocks(self, owner, memory: Optional[torch.Tensor], batch_size: int):
        """(rows before the segment B x before x C or None, rows after it B x after x C or None) for a segment
        entered with `memory` (the carried memory, None at a stream's start)."""
        return None, None

    def written(self, offset: int, T: int) -> slice:
        """The rows whose output the scheme writes from, in a segment whose rows start with `offset` rows of the
        family's own (the encoder's <s>) and hold T segment tokens."""
        if self.causal:
            start = offset + self.before + T
            return slice(start, start + self.after)
        return slice(offset, offset + self.M)

    def segment(self, offset: int, T: int) -> slice:
        """The segment tokens' rows."""
        return slice(offset + self.before, offset + self.before + T)

    # ---- per layer ----------------------------------------------------------------------------------------------

    def read(self, owner, layer: int, h: torch.Tensor, assoc) -> torch.Tensor:
        """h B x N x C before layer `layer` -> h after the scheme's read (unchanged here)."""
        return h

    def write(self, owner, layer: int, h: torch.Tensor, assoc, rows: slice) -> List[torch.Tensor]:
        """Layer `layer`'s output h B x N x C -> the layer's new state ([A, z] for ARMT; [] here)."""
        return []

    def read_layers(self, owner, first: int, x: torch.Tensor, assoc):
        """The diagonal schedule's `read` for layers first .. first+G-1: x G x B x N x C, assoc [A G x ..., z G x ...]
        or None -> (x, what write_layers needs)."""
        return x, None

    def write_layers(self, owner, first: int, x: torch.Tensor, states, rows: slice):
        """The diagonal schedule's `write`: x G x B x N x C -> [A G x ..., z G x ...] or None."""
        return None

    def update_cache(self, cache: Optional[torch.Tensor], seg: torch.Tensor) -> Optional[torch.Tensor]:
        """Transformer-XL's cache of one layer: the previous B x L x C and this segment's rows B x T x C of the
        layer's input -> the last mem_len of them, detached; None without a cache."""
        if self.mem_len <= 0:
            return None
        prev = cache if cache is not None else seg[:, :0]
        return torch.cat([prev, seg], dim=1)[:, -self.mem_len :].detach()

    # ---- after the last layer -----------------------------------------------------------------------------------

    def carry(self, owner, h: torch.Tensor, rows: slice, read: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The last layer's output h B x N x C (its written `rows`) and the memory read by the segment -> the memory
        the next segment reads, B x M x C; None for schemes that carry none."""
        return None

    @property
    def diagonal_exact(self) -> bool:
        return not self.carries_tokens

    def describe(self, owner) -> Optional[str]:
        """What the scheme carries, with the flags that set it (the training summary line); None: nothing."""
        return None


class MT(MemoryScheme):
    """The paper's MT ablation: M learned tokens before the segment, read, nothing written or carried."""

    name = "mt"

    @property
    def before(self) -> int:
        return self.M

    def blocks(self, owner, memory, batch_size):
        return owner.memory(batch_size), None

    def describe(self, owner):
        return f"{self.M} memory tokens (--mem-tokens, --memory-layout mt), not carried"


class RMT(MemoryScheme):
    """RMT's token memory (module docstring)."""

    name = "rmt"
    carries_tokens = True

    @property
    def before(self) -> int:
        return self.M

    @property
    def after(self) -> int:
        return self.M if self.causal else 0

    def blocks(self, owner, memory, batch_size):
        read = memory if memory is not None else owner.memory(batch_size)  # B x M x C
        # paper §3.2: the same memory is placed as the read block and as the write block (a decoder)
        return read, (read if self.causal else None)

    def carry(self, owner, h, rows, read):
        return h[:, rows]

    def describe(self, owner):
        return f"RMT, {self.M} memory tokens (--mem-tokens) whose outputs are the next segment's memory"


class GatedRMT(RMT):
    """RMT with a gated write (module docstring): `memory_gate` (Linear 2C -> C, zero weights) mixes the written
    rows with the memory the segment read."""

    name = "gated"

    modules = ("memory", "memory_gate")

    def build(self, name, embed_dim, num_layers, cfg, init_std=1.0):
        if name != "memory_gate":
            return super().build(name, embed_dim, num_layers, cfg, init_std)
        inputs = 1 if str(getattr(cfg, "memory_gate_input", None) or GATE_INPUTS[0]) == "read" else 2
        gate = nn.Linear(inputs * embed_dim, embed_dim)  # --memory-gate-input: [w; r] (2C) or r (C)
        nn.init.zeros_(gate.weight)
        nn.init.constant_(gate.bias, float(getattr(cfg, "memory_gate_bias", None) or 0.0))  # --memory-gate-bias
        return gate

    gate = staticmethod(torch.sigmoid)

    def carry(self, owner, h, rows, read):
        w, r = h[:, rows], read.to(h.dtype)  # B x M x C
        gate_in = r if owner.memory_gate.in_features == r.size(-1) else torch.cat([w, r], dim=-1)
        z = self.gate(owner.memory_gate(gate_in))  # B x M x C
        return z * w + (1 - z) * r

    def describe(self, owner):
        return (f"RMT with a gated write, {self.M} memory tokens (--mem-tokens, --memory-layout {self.name}) whose "
                f"outputs the next segment's memory mixes with the memory read")


class HardGatedRMT(GatedRMT):
    """GatedRMT with torch's hard sigmoid as the gate (module docstring): a closed slot keeps its memory exactly."""

    name = "gated_hard"
    gate = staticmethod(nn.functional.hardsigmoid)


class ARMT(MemoryScheme):
    """ARMT's associative memory (module docstring; modules/associative.py)."""

    name = "armt"
    associative = True

    @property
    def before(self) -> int:
        return 0 if self.causal else self.M

    @property
    def after(self) -> int:
        return self.M if self.causal else 0

    modules = ("memory", "assoc_layers")

    def build(self, name, embed_dim, num_layers, cfg, init_std=1.0):
        if name != "assoc_layers":
            return super().build(name, embed_dim, num_layers, cfg, init_std)
        rule = str(cfg.associative_write)  # --associative-write
        return nn.ModuleList(associative.AssociativeMemory(embed_dim, cfg.d_mem, cfg.dpfp_nu, rule)
                             for _ in range(num_layers))

    def blocks(self, owner, memory, batch_size):
        mem = owner.memory(batch_size)  # learned memory tokens, not carried
        return (None, mem) if self.causal else (mem, None)

    def read(self, owner, layer, h, assoc):
        return owner.assoc_layers[layer].read(h, *associative.layer_state(assoc, layer), self.state_dtype)

    def write(self, owner, layer, h, assoc, rows):
        return list(owner.assoc_layers[layer].write(h[:, rows], *associative.layer_state(assoc, layer),
                                                    self.state_dtype))

    def read_layers(self, owner, first, x, assoc):
        # per layer, the sequential forward's calls (associative.read_layers says why)
        return associative.read_layers(owner.assoc_layers[first : first + x.size(0)], x, assoc, self.state_dtype)

    def write_layers(self, owner, first, x, states, rows):
        return associative.write_layers(owner.assoc_layers[first : first + x.size(0)], x[:, :, rows], states,
                                        self.state_dtype)

    def describe(self, owner):
        blocks = owner.assoc_layers
        return (f"ARMT, an associative memory of d_mem {blocks[0].d_mem} (--d-mem) in each of {len(blocks)} layers, "
                f"written by {self.M} memory tokens (--mem-tokens)")


SCHEMES = {"none": MemoryScheme, "mt": MT, "rmt": RMT, "gated": GatedRMT, "gated_hard": HardGatedRMT, "armt": ARMT}
GATED_LAYOUTS = tuple(n for n, kind in SCHEMES.items() if issubclass(kind, GatedRMT))  # those with an update gate


def scheme_name(cfg) -> str:
    """The scheme the flags select: --mem-tokens 0 -> none, --associative-memory -> armt, else --memory-layout."""
    if int(getattr(cfg, "mem_tokens", 0) or 0) == 0:
        return "none"
    if getattr(cfg, "associative_memory", False):
        return "armt"
    return str(getattr(cfg, "memory_layout", None) or "rmt")


def scheme_from(cfg, causal: bool = True) -> MemoryScheme:
    """The scheme of a model config (any family's: mem_tokens, memory_layout, associative_memory,
    associative_state_dtype, mem_len)."""
    return SCHEMES[scheme_name(cfg)](
        int(getattr(cfg, "mem_tokens", 0) or 0), causal=causal, mem_len=int(getattr(cfg, "mem_len", 0) or 0),
        state_dtype=associative.state_dtype(getattr(cfg, "associative_state_dtype", None) or "fp32"))


class SchemeModel:
    """The memory part of the segment interface (modules/recurrence.py) for a family whose `scheme` is a
    MemoryScheme and whose modules `build` made are registered on it (`install_scheme`)."""

    scheme: MemoryScheme

    def install_scheme(self, scheme: MemoryScheme, embed_dim: int, num_layers: int, cfg, init_std: float = 1.0,
                       names: Optional[Tuple[str, ...]] = None) -> None:
        """Build the scheme's modules `names` (default: all of them) and register them on this module."""
        self.scheme = scheme
        for name in scheme.modules if names is None else names:
            if name in scheme.modules:
                setattr(self, name, scheme.build(name, embed_dim, num_layers, cfg, init_std))
        if "assoc_layers" not in self._modules:
            self.assoc_layers = None

    @property
    def num_mem_tokens(self) -> int:
        return self.scheme.M

    @property
    def recurrent(self) -> bool:
        """Token memory carried from segment to segment (RMT, gated)."""
        return self.scheme.carries_tokens

    @property
    def associative(self) -> bool:
        return self.scheme.associative

    @property
    def mem_len(self) -> int:
        """Transformer-XL's cache length L (0: none; only rmt_lm has the flag)."""
        return self.scheme.mem_len

    @property
    def assoc_dtype(self) -> Optional[torch.dtype]:
        """ARMT's state dtype (None: the model's); set it to change the scheme's."""
        return self.scheme.state_dtype

    @assoc_dtype.setter
    def assoc_dtype(self, dtype: Optional[torch.dtype]) -> None:
        self.scheme.state_dtype = dtype

    def initial_memory(self, batch_size: int) -> Optional[torch.Tensor]:
        return self.scheme.initial(self, batch_size)  # B x M x C


def rows_around(scheme: MemoryScheme, owner, x: torch.Tensor, memory: Optional[torch.Tensor]
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """x B x T x C (the segment's embedded tokens) -> ([before | x | after] B x N x C, the memory read: the before
    block of a scheme that carries memory, for `carry`)."""
    before, after = scheme.blocks(owner, memory, x.size(0))
    parts = [p for p in (before, x, after) if p is not None]
    return (torch.cat(parts, dim=1) if len(parts) > 1 else x), (before if scheme.carries_tokens else None)
