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
"""

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Protocol

import torch
from torch.utils.checkpoint import checkpoint as torch_checkpoint

BPTT_MODES = ("block", "sliding")


@dataclass
class SegmentOutput:
    hidden: torch.Tensor  # B x T x C, final-layer states of the segment tokens
    memory: Optional[torch.Tensor]  # B x M x C, memory for the next segment (None without memory tokens)
    cache: Optional[List[torch.Tensor]]  # per layer B x L x C, detached XL cache (None without --mem-len)


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


@dataclass
class RecurrentState:
    """Per-stream recurrent state carried from one batch to the next: explicit data, owned by the caller
    (the task keeps one per split; eval-lm keeps one on the model). Reset at the start of every pass."""

    memory: Optional[torch.Tensor] = None  # B x M x C entering the next segment, detached
    cache: Optional[List[torch.Tensor]] = None  # per layer B x L x C, detached
    window: List[WindowEntry] = field(default_factory=list)  # sliding mode: the last <= K segments
    segments_seen: int = 0  # segments consumed since the last reset

    def reset(self) -> None:
        self.memory, self.cache, self.window, self.segments_seen = None, None, [], 0

    def state_dict(self) -> dict:
        """Plain tensors and ints only, so checkpoints load under torch.load(weights_only=True)."""
        return {
            "memory": self.memory,
            "cache": self.cache,
            "window": [{"tokens": w.tokens, "memory": w.memory, "cache": w.cache} for w in self.window],
            "segments_seen": self.segments_seen,
        }

    def load_state_dict(self, d: dict) -> None:
        self.memory, self.cache = d["memory"], d["cache"]
        self.window = [WindowEntry(w["tokens"], w["memory"], w["cache"]) for w in d["window"]]
        self.segments_seen = int(d["segments_seen"])

    def to(self, device: torch.device, dtype: Optional[torch.dtype] = None) -> "RecurrentState":
        """Move every tensor to `device` (floating ones also to `dtype`), in place; returns self. A resumed or
        exported state (saved on CPU, maybe in another precision) joins the model this way before a step."""

        def mv(t):
            if t is None:
                return None
            return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)

        mvl = lambda ts: None if ts is None else [mv(t) for t in ts]  # noqa: E731
        self.memory, self.cache = mv(self.memory), mvl(self.cache)
        self.window = [WindowEntry(mv(w.tokens), mv(w.memory), mvl(w.cache)) for w in self.window]
        return self

    def snapshot(self) -> "RecurrentState":
        """A shallow copy (tensors are replaced by the loop, never written in place): the state to go back to."""
        return RecurrentState(self.memory, self.cache, list(self.window), self.segments_seen)


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
        "window": [{k: cat([s["window"][i][k] for s in states]) for k in ("tokens", "memory", "cache")}
                   for i in range(len(first["window"]))],
        "segments_seen": int(first["segments_seen"]),
    }


def slice_state(state: dict, start: int, stop: int) -> dict:
    """The state dict of streams start..stop-1 of a state dict (the inverse of concat_states)."""
    cut = lambda x: _rows(x, lambda t: t[start:stop].clone())  # noqa: E731
    return {"memory": cut(state["memory"]), "cache": cut(state["cache"]),
            "window": [{k: cut(w[k]) for k in ("tokens", "memory", "cache")} for w in state["window"]],
            "segments_seen": int(state["segments_seen"])}


def num_streams(state: dict) -> Optional[int]:
    """How many streams a state dict holds (None for a fresh state with no tensors)."""
    for t in [state["memory"], *(state["cache"] or [])] + [w["tokens"] for w in state["window"]]:
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


def _run_one(model, tokens, target, memory, cache, use_checkpoint: bool):
    """One segment forward (and its loss when target is given); with use_checkpoint its activations are
    recomputed in backward (non-reentrant: the only kind that survives weights shared across segments under
    ZeRO-2/3) so that an unroll of K segments keeps only the memory states alive."""

    def fn(tokens, memory, *cache):
        out = model.forward_segment(tokens, memory, list(cache) if cache else None)
        loss = model.segment_loss(out.hidden, target) if target is not None else None
        return loss, out

    if not use_checkpoint:
        return fn(tokens, memory, *(cache or []))

    def ckpt_fn(tokens, memory, *cache):
        loss, out = fn(tokens, memory, *cache)
        return loss, out.memory, *(out.cache or [])

    loss, mem, *new_cache = torch_checkpoint(ckpt_fn, tokens, memory, *(cache or []), use_reentrant=False)
    # hidden states are not kept under checkpointing (that is the point); callers needing them don't checkpoint
    return loss, SegmentOutput(hidden=None, memory=mem, cache=new_cache if new_cache else None)


def split_segments(x: torch.Tensor, seg_len: int) -> List[torch.Tensor]:
    """B x (S*T) -> S tensors of B x T (the last may be shorter)."""
    return list(x.split(seg_len, dim=1))


def run_segments(
    model: SegmentModel,
    tokens: torch.Tensor,  # B x S*T
    target: Optional[torch.Tensor],  # B x S*T, or None to skip the loss
    state: RecurrentState,
    seg_len: int,
    bptt_unroll: Optional[int] = 0,
    bptt_mode: str = "block",
    checkpoint_segments: bool = False,
    return_hidden: bool = False,
    on_segment: Optional[Callable[[int, SegmentOutput], None]] = None,
) -> LoopOutput:
    """Run the segments of `tokens` in order, updating `state` in place. See the module docstring."""
    if bptt_mode not in BPTT_MODES:
        raise ValueError(f"--bptt-mode must be one of {BPTT_MODES}, got {bptt_mode!r}")
    B = tokens.size(0)
    if state.memory is not None and state.memory.size(0) != B:
        raise ValueError(f"recurrent state holds {state.memory.size(0)} streams but the batch has {B}")
    seg_tokens = split_segments(tokens, seg_len)
    seg_targets = split_segments(target, seg_len) if target is not None else [None] * len(seg_tokens)
    grad = torch.is_grad_enabled()
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
    cache = state.cache
    losses, hidden, ntokens = [], [] if return_hidden else None, 0
    for s, (tok, tgt) in enumerate(zip(seg_tokens, seg_targets)):
        if sliding:
            # recompute the last <= K segments from the memory saved when they were first seen
            # (a saved memory of None means the stream's learned initial memory, rebuilt here so that its
            # parameters keep receiving gradient while they are inside the window)
            window = state.window
            if window:
                mem_w = carried(window[0].memory)
                cache_w, initial = window[0].cache, window[0].memory is None
            else:
                mem_w, cache_w, initial = memory, cache, state.memory is None
            new_window = []
            for entry in window:
                new_window.append(WindowEntry(entry.tokens, None if initial else _detach(mem_w), _detach(cache_w)))
                _, out = _run_one(model, entry.tokens, None, mem_w, cache_w, use_ckpt)
                mem_w, cache_w, initial = out.memory, out.cache, False
            new_window.append(WindowEntry(tok, None if initial else _detach(mem_w), _detach(cache_w)))
            state.window = new_window[-bptt_unroll:]
            memory, cache = mem_w, cache_w
        loss, out = _run_one(model, tok, tgt, memory, cache, use_ckpt)
        if on_segment is not None:
            on_segment(s, out)
        if loss is not None:
            losses.append(loss)
            ntokens += int(tgt.ne(model.padding_idx).sum())  # pad targets are not scored
        if return_hidden:
            hidden.append(out.hidden)
        memory, cache = out.memory, out.cache
        if sliding:
            memory = _detach(memory)  # the next segment reaches back through its own recomputed window
        elif bptt_unroll is not None and (s + 1) % (bptt_unroll + 1) == 0:
            memory = _detach(memory)  # block boundary inside a call (samples longer than K+1 segments)
        state.segments_seen += 1
    # truncation at the block boundary: the next call starts from detached memory
    state.memory, state.cache = _detach(memory), _detach(cache)
    return LoopOutput(losses=losses, ntokens=ntokens, hidden=hidden)
