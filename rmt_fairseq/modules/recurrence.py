"""THE segment loop: run segments in order, carry memory and XL cache, truncate BPTT, checkpoint segments.

Every path goes through `run_segments`: the training criterion, validation, fairseq-eval-lm (through the
model's forward) and the DeepSpeed trainer. Nothing else may loop over segments.

Legend: B batch (parallel streams), S segments in the batch, T segment tokens, M memory tokens, L XL-cache
length, C model dim, K BPTT unroll.

Truncated BPTT (`bptt_unroll` K), two modes:
  block    each call gets K+1 consecutive segments, scores all of them; memory entering the block is detached,
           so the loss of the block's i-th segment (0-based) reaches back i segments.
  sliding  the authors' LM-RMT semantics: each new segment is scored once, after recomputing the K segments
           before it from the memory saved when they were first seen; the loss of segment s reaches back
           exactly K segments. Costs K+1 segment passes per scored segment.
Without gradients (validation, eval-lm) both modes reduce to one pass per segment with memory carried.
The XL cache is detached as in Transformer-XL; gradient reaches earlier segments only through memory.

ARMT's associative state (modules/associative.py: per layer A_l, z_l) is carried like memory: through the
segments of a call with gradient, detached where memory is detached, kept in the window in sliding mode, saved
with the state.

Schedules (inference only, without gradients): `sequential` runs segment after segment, every layer;
`diagonal` (Sivtsov et al. 2025, "Diagonal Batching", arXiv 2506.05229) runs the (segment, layer) grid by
anti-diagonals: when layer l of segment s needs only layer l of segment s-1 (its associative state or XL cache)
and layer l-1 of segment s, all pairs with s + l = d are ready together and the model runs them as one batched
call per group of equal shapes (`diagonal_layers`). Exact for ARMT, the XL cache and no memory; RMT's token
memory goes from the last layer of s to the first of s+1, so its grid has no such diagonals and it runs
sequentially (`diagonal_ok` False).
"""

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Protocol

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

BPTT_MODES = ("block", "sliding")


@dataclass
class SegmentOutput:
    hidden: torch.Tensor  # B x T x C, final-layer states of the segment tokens
    memory: Optional[torch.Tensor]  # B x M x C, memory for the next segment (None without memory tokens)
    cache: Optional[List[torch.Tensor]]  # per layer B x L x C, detached XL cache (None without --mem-len)
    assoc: Optional[List[torch.Tensor]] = None  # ARMT: [A_0 B x F x C, z_0 B x F, A_1, ...] after the segment


class SegmentModel(Protocol):
    """What the loop needs from a model (rmt_lm's decoder implements it)."""

    def initial_memory(self, batch_size: int) -> Optional[torch.Tensor]: ...

    def forward_segment(
        self, tokens: torch.Tensor, memory: Optional[torch.Tensor], cache: Optional[List[torch.Tensor]]
    ) -> SegmentOutput: ...

    def segment_loss(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor: ...

    padding_idx: int  # targets equal to it are not scored

    @property
    def recurrent(self) -> bool: ...


@dataclass
class WindowEntry:
    """A segment kept for sliding-mode recomputation: its tokens and what entered it (all detached)."""

    tokens: torch.Tensor  # B x T
    memory: Optional[torch.Tensor]  # B x M x C
    cache: Optional[List[torch.Tensor]]  # per layer B x L x C
    assoc: Optional[List[torch.Tensor]] = None  # ARMT: per layer A, z


@dataclass
class RecurrentState:
    """Per-stream recurrent state carried from one batch to the next: explicit data, owned by the caller
    (the task keeps one per split; eval-lm keeps one on the model). Reset at the start of every pass."""

    memory: Optional[torch.Tensor] = None  # B x M x C entering the next segment, detached
    cache: Optional[List[torch.Tensor]] = None  # per layer B x L x C, detached
    window: List[WindowEntry] = field(default_factory=list)  # sliding mode: the last <= K segments
    segments_seen: int = 0  # segments consumed since the last reset
    assoc: Optional[List[torch.Tensor]] = None  # ARMT: [A_0 B x F x C, z_0 B x F, ...], in the state dtype

    def reset(self) -> None:
        self.memory, self.cache, self.window, self.segments_seen, self.assoc = None, None, [], 0, None

    def state_dict(self) -> dict:
        """Plain tensors and ints only, so checkpoints load under torch.load(weights_only=True)."""
        return {
            "memory": self.memory,
            "cache": self.cache,
            "window": [{"tokens": w.tokens, "memory": w.memory, "cache": w.cache, "assoc": w.assoc}
                       for w in self.window],
            "segments_seen": self.segments_seen,
            "assoc": self.assoc,
        }

    def load_state_dict(self, d: dict) -> None:
        self.memory, self.cache = d["memory"], d["cache"]
        self.window = [WindowEntry(w["tokens"], w["memory"], w["cache"], w.get("assoc")) for w in d["window"]]
        self.segments_seen = int(d["segments_seen"])
        self.assoc = d.get("assoc")  # states saved before ARMT existed have none

    def to(self, device: torch.device, dtype: Optional[torch.dtype] = None,
           assoc_dtype: Optional[torch.dtype] = None) -> "RecurrentState":
        """Move every tensor to `device` (floating ones also to `dtype`; the associative state to `assoc_dtype`,
        kept as it is when None), in place; returns self. A resumed or exported state (saved on CPU, maybe in
        another precision) joins the model this way before a step."""

        def mv(t, dt=dtype):
            if t is None:
                return None
            return t.to(device=device, dtype=dt if dt is not None and t.is_floating_point() else t.dtype)

        mvl = lambda ts, dt=dtype: None if ts is None else [mv(t, dt) for t in ts]  # noqa: E731
        self.memory, self.cache, self.assoc = mv(self.memory), mvl(self.cache), mvl(self.assoc, assoc_dtype)
        self.window = [WindowEntry(mv(w.tokens), mv(w.memory), mvl(w.cache), mvl(w.assoc, assoc_dtype))
                       for w in self.window]
        return self

    def snapshot(self) -> "RecurrentState":
        """A shallow copy (tensors are replaced by the loop, never written in place): the state to go back to."""
        return RecurrentState(self.memory, self.cache, list(self.window), self.segments_seen, self.assoc)


def _rows(x, fn):
    """Apply fn to every batch-first tensor of a state dict (memory, cache, window), keeping the structure."""
    if x is None:
        return None
    if isinstance(x, list):
        return [_rows(t, fn) for t in x]
    return fn(x)


def concat_states(states: List[dict]) -> dict:
    """State dicts of disjoint groups of streams (e.g. one per data-parallel rank, in rank order) -> the state
    dict of all of them (B_total along dim 0). Every part must be at the same point of its streams."""
    first = states[0]
    seen = {int(s["segments_seen"]) for s in states}
    assert len(seen) == 1, f"streams at different positions: {sorted(seen)}"

    def cat(parts):
        if parts[0] is None:
            return None
        if isinstance(parts[0], list):
            return [cat([p[i] for p in parts]) for i in range(len(parts[0]))]
        return torch.cat(parts, dim=0)

    return {
        "memory": cat([s["memory"] for s in states]),
        "cache": cat([s["cache"] for s in states]),
        "window": [{k: cat([s["window"][i].get(k) for s in states]) for k in ("tokens", "memory", "cache", "assoc")}
                   for i in range(len(first["window"]))],
        "segments_seen": int(first["segments_seen"]),
        "assoc": cat([s.get("assoc") for s in states]),
    }


def slice_state(state: dict, start: int, stop: int) -> dict:
    """The state dict of streams start..stop-1 of a state dict (the inverse of concat_states)."""
    cut = lambda x: _rows(x, lambda t: t[start:stop].clone())  # noqa: E731
    return {"memory": cut(state["memory"]), "cache": cut(state["cache"]),
            "window": [{k: cut(w.get(k)) for k in ("tokens", "memory", "cache", "assoc")} for w in state["window"]],
            "segments_seen": int(state["segments_seen"]), "assoc": cut(state.get("assoc"))}


def num_streams(state: dict) -> Optional[int]:
    """How many streams a state dict holds (None for a fresh state with no tensors)."""
    for t in [state["memory"], *(state["cache"] or []), *(state.get("assoc") or [])] + [
            w["tokens"] for w in state["window"]]:
        if t is not None:
            return int(t.size(0))
    return None


@dataclass
class LoopOutput:
    losses: List[torch.Tensor]  # one summed NLL (fp32 scalar) per scored segment
    ntokens: int  # number of scored target tokens
    hidden: Optional[List[torch.Tensor]]  # per segment B x T x C, when return_hidden


def _detach(t):
    if t is None:
        return None
    if isinstance(t, list):
        return [x.detach() for x in t]
    return t.detach()


def _run_one(model, tokens, target, memory, cache, assoc, use_checkpoint: bool):
    """One segment forward (and its loss when target is given); with use_checkpoint its activations are
    recomputed in backward (non-reentrant: the only kind that survives weights shared across segments under
    ZeRO-2/3) so that an unroll of K segments keeps only the memory states alive. `assoc` is passed only to
    models with an associative memory (`model.associative`)."""
    associative = getattr(model, "associative", False)
    n_cache = len(cache) if cache else 0

    def fn(tokens, memory, *rest):
        c, a = list(rest[:n_cache]) or None, list(rest[n_cache:]) or None
        if associative:
            out = model.forward_segment(tokens, memory, c, assoc=a)
        else:
            out = model.forward_segment(tokens, memory, c)
        loss = model.segment_loss(out.hidden, target) if target is not None else None
        return loss, out

    args = [*(cache or []), *(assoc or [])]
    if not use_checkpoint:
        return fn(tokens, memory, *args)

    def ckpt_fn(tokens, memory, *rest):
        loss, out = fn(tokens, memory, *rest)
        return loss, out.memory, len(out.cache or []), *(out.cache or []), *(out.assoc or [])

    loss, mem, n_new, *rest = torch_checkpoint(ckpt_fn, tokens, memory, *args, use_reentrant=False)
    # hidden states are not kept under checkpointing (that is the point); callers needing them don't checkpoint
    return loss, SegmentOutput(hidden=None, memory=mem, cache=list(rest[:n_new]) or None,
                               assoc=list(rest[n_new:]) or None)


def split_segments(x: torch.Tensor, seg_len: int) -> List[torch.Tensor]:
    """B x (S*T) -> S tensors of B x T (the last may be shorter)."""
    return list(x.split(seg_len, dim=1))


SCHEDULES = ("sequential", "diagonal")
DEFAULT_SEGMENT_LEN = 128  # tokens per segment when neither the flags, the architecture nor a checkpoint set it


def run_segments(
    model: SegmentModel,
    tokens: torch.Tensor,  # B x S*T
    target: Optional[torch.Tensor],  # B x S*T, or None to skip the loss
    state: RecurrentState,
    seg_len: int,
    bptt_unroll: Optional[int] = None,
    bptt_mode: str = "block",
    checkpoint_segments: bool = False,
    return_hidden: bool = False,
    on_segment: Optional[Callable[[int, SegmentOutput], None]] = None,
    schedule: str = "sequential",
) -> LoopOutput:
    """Run the segments of `tokens` in order, updating `state` in place. See the module docstring.

    schedule "diagonal" applies without gradients to a model with `diagonal_ok` (else the call runs
    sequentially); `on_segment` then gets each segment's hidden states only (memory, cache and associative
    state of the grid's last column are in `state` at the end)."""
    if bptt_mode not in BPTT_MODES:
        raise ValueError(f"--bptt-mode must be one of {BPTT_MODES}, got {bptt_mode!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    B = tokens.size(0)
    held = state.memory if state.memory is not None else (state.assoc[0] if state.assoc else None)
    if held is not None and held.size(0) != B:
        raise ValueError(f"recurrent state holds {held.size(0)} streams but the batch has {B}")
    seg_tokens = split_segments(tokens, seg_len)
    seg_targets = split_segments(target, seg_len) if target is not None else [None] * len(seg_tokens)
    grad = torch.is_grad_enabled()
    if schedule == "diagonal" and not grad and getattr(model, "diagonal_ok", False) and len(seg_tokens) > 1:
        return _run_diagonal(model, seg_tokens, seg_targets, state, return_hidden, on_segment)
    use_ckpt = checkpoint_segments and grad and not return_hidden
    # bptt_unroll None: gradient through every segment of the call (independent samples, e.g. rmt_algorithmic)
    sliding = bptt_mode == "sliding" and grad and bptt_unroll is not None and bptt_unroll > 0

    # The learned initial memory is computed on every call, not only at a stream's start: its module then runs
    # and its parameters join the graph on every rank in every step (zero gradient while the streams continue),
    # so data-parallel reducers (DDP buckets, ZeRO-1/2 reduction, ZeRO-3 gathers) see the same parameters in the
    # same order on every rank whatever the data. Adding 0 x init is exact for finite values.
    init = model.initial_memory(B)  # B x M x C, or None without recurrent memory

    def carried(saved):  # the memory entering a segment: a saved one (joined by 0 x init), or the initial one
        if saved is None:
            return init
        return saved if init is None else saved + 0.0 * init

    memory = carried(state.memory)
    cache, assoc = state.cache, state.assoc
    losses, hidden, ntokens = [], [] if return_hidden else None, 0
    for s, (tok, tgt) in enumerate(zip(seg_tokens, seg_targets)):
        if sliding:
            # recompute the last <= K segments from the memory saved when they were first seen
            # (a saved memory of None means the stream's learned initial memory, rebuilt here so that its
            # parameters keep receiving gradient while they are inside the window)
            window = state.window
            if window:
                mem_w = carried(window[0].memory)
                cache_w, assoc_w, initial = window[0].cache, window[0].assoc, window[0].memory is None
            else:
                mem_w, cache_w, assoc_w, initial = memory, cache, assoc, state.memory is None
            new_window = []
            for entry in window:
                new_window.append(WindowEntry(entry.tokens, None if initial else _detach(mem_w), _detach(cache_w),
                                              _detach(assoc_w)))
                _, out = _run_one(model, entry.tokens, None, mem_w, cache_w, assoc_w, use_ckpt)
                mem_w, cache_w, assoc_w, initial = out.memory, out.cache, out.assoc, False
            new_window.append(WindowEntry(tok, None if initial else _detach(mem_w), _detach(cache_w),
                                          _detach(assoc_w)))
            state.window = new_window[-bptt_unroll:]
            memory, cache, assoc = mem_w, cache_w, assoc_w
        loss, out = _run_one(model, tok, tgt, memory, cache, assoc, use_ckpt)
        if on_segment is not None:
            on_segment(s, out)
        if loss is not None:
            losses.append(loss)
            ntokens += int(tgt.ne(model.padding_idx).sum())  # pad targets are not scored
        if return_hidden:
            hidden.append(out.hidden)
        memory, cache, assoc = out.memory, out.cache, out.assoc
        # truncation, the one place the carried state leaves the graph: in sliding mode after every segment (the
        # next one reaches back through its own recomputed window), in block mode after every K+1 segments of a
        # call (samples longer than a block), and after the call's last segment (the next call starts detached)
        block_end = bptt_unroll is not None and (s + 1) % (bptt_unroll + 1) == 0
        if sliding or block_end or s == len(seg_tokens) - 1:
            memory, cache, assoc = _detach(memory), _detach(cache), _detach(assoc)
        state.segments_seen += 1
    state.memory, state.cache, state.assoc = memory, cache, assoc
    return LoopOutput(losses=losses, ntokens=ntokens, hidden=hidden)


class DiagonalModel(Protocol):
    """What the diagonal schedule needs from a model, besides SegmentModel (rmt_lm's decoder, the
    rmt_transformer_lm wrapper's and the rmt_encoder implement it).

    `diagonal_weights()` -> its layers' weights stacked (stack_layers), built once per call of the schedule;
    `diagonal_begin(tokens, cache_len)` -> (h B x N x C, the layer-0 input of the segment; tables, the segment's
    attention geometry and padding); `diagonal_layers(first, hs G x B x N x C, tables (a list of G: each
    segment's), caches G x B x L x C or None, assoc [A G x B x F x C, z G x B x F] or None, weights)` runs layers
    first .. first+G-1 on one segment each, as one batched call, and returns (hs out, the inputs to cache
    G x B x T x C or None, new [A, z] or None); `diagonal_end(h, tables)` -> the segment's hidden states."""

    num_layers: int
    mem_len: int

    def diagonal_begin(self, tokens: torch.Tensor, cache_len: int): ...

    def diagonal_weights(self) -> Dict[str, torch.Tensor]: ...

    def diagonal_layers(self, first: int, hs, tables, caches, assoc, weights): ...

    def diagonal_end(self, h: torch.Tensor, tables) -> torch.Tensor: ...


def stack_layers(lists: Dict[str, nn.ModuleList]) -> Dict[str, torch.Tensor]:
    """{prefix: ModuleList of equal modules} -> {prefix + parameter name: len(layers) x (the parameter's shape)}:
    the weights the diagonal schedule's batched call multiplies with (torch.func.stack_module_state), detached.

    Built for each call of the diagonal schedule and dropped after it, never cached: fairseq's optimizers, its
    fp16/bf16 master copy and DeepSpeed write weights through `p.data`, which changes neither `data_ptr` nor
    `_version`, so no cache key can see an update (a cached copy went stale after the first optimizer step:
    training-time validation disagreed with fairseq-validate). One copy of the layers' weights per call, against
    the call's S segments x n_layers layer applications."""
    from torch.func import stack_module_state

    with torch.no_grad():
        return {prefix + name: t.detach() for prefix, ml in lists.items()
                for name, t in stack_module_state(list(ml))[0].items()}


def _run_diagonal(model, seg_tokens, seg_targets, state, return_hidden, on_segment) -> LoopOutput:
    """The diagonal schedule of the module docstring, without gradients. Per layer l the loop keeps what segment
    s at layer l hands to segment s+1 at layer l (its XL cache and associative state); layer inputs of the
    segments in flight; nothing else, so memory does not grow with the number of segments."""
    S, n_layers, mem_len = len(seg_tokens), model.num_layers, model.mem_len
    weights = model.diagonal_weights()  # this call's copy (stack_layers: never kept between calls)
    cache = list(state.cache) if state.cache is not None else ([None] * n_layers if mem_len > 0 else None)
    assoc = [state.assoc[2 * i: 2 * i + 2] for i in range(n_layers)] if state.assoc else [None] * n_layers
    cache_len = [0] * S  # the cache length every layer of segment s sees (the same for all layers)
    L0 = state.cache[0].size(1) if state.cache is not None else 0
    h, tables = [None] * S, [None] * S
    losses, hidden, ntokens = [], [] if return_hidden else None, 0
    for d in range(S + n_layers - 1):
        pairs = [(d - layer, layer) for layer in range(max(0, d - S + 1), min(n_layers, d + 1))]  # (s, l), l up
        for s, layer in pairs:
            if layer == 0:
                if mem_len > 0:
                    cache_len[s] = L0 if s == 0 else min(mem_len, cache_len[s - 1] + seg_tokens[s - 1].size(1))
                h[s], tables[s] = model.diagonal_begin(seg_tokens[s], cache_len[s])
        # one batched call per run of consecutive layers whose segments have the same shape and state kind
        groups = []
        for s, layer in pairs:
            key = (tuple(h[s].shape), cache_len[s], assoc[layer] is None,
                   cache is not None and cache[layer] is None)
            if groups and groups[-1][0] == key:
                groups[-1][1].append((s, layer))
            else:
                groups.append((key, [(s, layer)]))
        for _, group in groups:
            first = group[0][1]
            hs = torch.stack([h[s] for s, _ in group])  # G x B x N x C
            caches = None
            if cache is not None and cache[first] is not None:
                caches = torch.stack([cache[layer] for _, layer in group])  # G x B x L x C
            a = None
            if assoc[first] is not None:
                a = [torch.stack([assoc[layer][0] for _, layer in group]),
                     torch.stack([assoc[layer][1] for _, layer in group])]
            out, seg_in, new_a = model.diagonal_layers(first, hs, [tables[s] for s, _ in group], caches, a,
                                                       weights)
            for g, (s, layer) in enumerate(group):
                h[s] = out[g]
                if seg_in is not None:
                    prev = cache[layer] if cache[layer] is not None else seg_in[g][:, :0]
                    cache[layer] = torch.cat([prev, seg_in[g]], dim=1)[:, -mem_len:]
                if new_a is not None:
                    assoc[layer] = [new_a[0][g], new_a[1][g]]
        done = d - (n_layers - 1)  # the segment whose last layer ran on this diagonal
        if done >= 0:
            out_h = model.diagonal_end(h[done], tables[done])
            h[done] = tables[done] = None
            if on_segment is not None:
                on_segment(done, SegmentOutput(hidden=out_h, memory=None, cache=None))
            tgt = seg_targets[done]
            if tgt is not None:
                losses.append(model.segment_loss(out_h, tgt))
                ntokens += int(tgt.ne(model.padding_idx).sum())
            if return_hidden:
                hidden.append(out_h)
            state.segments_seen += 1
    state.cache = cache
    state.assoc = [t for pair in assoc for t in pair] if assoc[0] is not None else None
    return LoopOutput(losses=losses, ntokens=ntokens, hidden=hidden)
