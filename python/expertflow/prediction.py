"""Training-free routing prediction and prefetch for offload().

Two predictors, merged:
- Gate lookahead: at MoE layer l, the routers of layers l+1..l+d are applied to layer l's
  hidden state. Each is the model's own router module, called as is (softmax or sigmoid
  scoring, group-limited top-k, normalisation, bias correction all apply), so nothing is
  reimplemented; the residual stream changes slowly, so these top-k sets predict the
  next layers' experts well.
- Transition history (the core's TransitionPredictor): which experts follow which from one
  layer to the next, and which ones the current request has used. It serves layers whose
  router is not reachable, ranks candidates beyond the router's top-k, and predicts that
  a layer will use again what this request has used there (request-level locality), so
  that eviction keeps those for their next use instead of treating them as unpredicted.

The merged candidates, best first and at most as many as that layer's tokens can use
(top-k x tokens), are prefetched while a copy pays on average (`Prefetcher.worth`): one
that is used hides the compute time before its layer, one that is not holds the link for
the rest of a copy, delaying the demand copies behind it. So when copies are short
against a layer every candidate goes, and when the link is the bottleneck only those
ranks that are right often enough. The cache keeps the predictions, lets the expertflow
policy use them, scores them (precision, recall) and cancels prefetches that turn stale.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from expertflow import _C

PREDICTORS = ("gate", "history", "combined")
HISTORY_WEIGHT = 0.5  # the history's share of a merged score; the router's is 1


def find_router(
    model: torch.nn.Module, experts_name: str, num_experts: int
) -> torch.nn.Module | None:
    """The router beside an experts module: a sibling whose weight has one row per expert,
    and that routes a hidden state on its own. Some routers need what only their MoE block
    passes (a hash router's input ids, an expert bias or a score correction given as an
    argument); gate lookahead cannot call those, so their layers predict by history."""
    parent_name, _, own_name = experts_name.rpartition(".")
    for name, child in model.get_submodule(parent_name).named_children():
        weight = getattr(child, "weight", None)
        if (
            name != own_name
            and isinstance(weight, torch.Tensor)
            and weight.dim() == 2
            and (weight.shape[0] == num_experts)
        ):
            return child if _routes_on_its_own(child, weight) else None
    return None


def _routes_on_its_own(router: torch.nn.Module, weight: torch.Tensor) -> bool:
    probe = torch.randn(2, weight.shape[1], generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            return router_choice(router, probe.to(weight.device, weight.dtype)) is not None
    except (TypeError, RuntimeError, ValueError):  # an argument it needs and did not get
        return False


def router_choice(router: torch.nn.Module, hidden_states: torch.Tensor):
    """(top-k indices, their weights) from the router's own forward, or None when its
    output has no [tokens, k] index tensor. Called past nn.Module hooks, so that output
    recorders (router logits) do not see these extra calls."""
    out = type(router).forward(router, hidden_states)
    tensors = out if isinstance(out, (tuple, list)) else (out,)
    index = next(
        (
            t
            for t in tensors
            if isinstance(t, torch.Tensor) and t.dim() == 2 and not t.is_floating_point()
        ),
        None,
    )
    if index is None:
        return None
    weights = next(
        (
            t
            for t in tensors
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.shape == index.shape
        ),
        torch.ones_like(index, dtype=torch.float32),
    )
    return index, weights


class LayerClock:
    """Times the compute between a layer's experts being ready and the next layer's experts
    forward, leaving out waits for copies on both backends. On the CPU a miss blocks acquire
    on the host, so the host clock started after acquire returns has none of it. On CUDA the
    host runs ahead and the compute stream waits instead, so the marks are events on that
    stream: the start is recorded after acquire's waits, so it completes once the copies
    have. The stop is recorded before the next layer's read, which waits for it, so
    `seconds()` never blocks."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        if self.cuda:
            self._start_event = torch.cuda.Event(enable_timing=True)
            self._stop_event = torch.cuda.Event(enable_timing=True)
        self._started = self._stopped = False
        self._start = self._stop = 0.0

    def start(self) -> None:
        if self.cuda:
            self._start_event.record(torch.cuda.current_stream(self.device))
        else:
            self._start = time.perf_counter()
        self._started, self._stopped = True, False

    def stop(self) -> None:
        if not self._started or self._stopped:
            return
        if self.cuda:
            self._stop_event.record(torch.cuda.current_stream(self.device))
        else:
            self._stop = time.perf_counter()
        self._stopped = True

    def seconds(self) -> float | None:
        """The interval from start to stop, once; None without both."""
        if not (self._started and self._stopped):
            return None
        self._started = False
        if self.cuda:
            return self._start_event.elapsed_time(self._stop_event) / 1e3
        return self._stop - self._start


@dataclass
class Prefetcher:
    """Predicts the next layers' experts and prefetches them; one per offload()."""

    cache: object  # expertflow.ExpertCache
    routers: list[torch.nn.Module | None]  # per layer
    num_experts: int
    experts_per_token: int
    predictor: str = "combined"
    lookahead: int = 1
    link_bytes_per_second: float = math.inf  # the link copies share; inf: copies are free
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    history: _C.TransitionPredictor = field(init=False)
    # Moving average of a layer's compute: from its experts being ready to the next layer's
    # experts forward (LayerClock). Waits for copies are not in it.
    layer_seconds: float = 0.0
    clock: LayerClock = field(init=False)
    _tokens: int = field(default=1, init=False)  # in the current forward
    # How often the candidate at each rank was chosen, over decode steps: [seen, used].
    _ranks: list[list[int]] = field(init=False)
    _ranked: dict[int, list[int]] = field(default_factory=dict, init=False)  # per layer

    @staticmethod
    def check(predictor: str, lookahead: int) -> None:
        if predictor not in PREDICTORS:
            raise ValueError(f"unknown predictor {predictor!r}; choose one of {PREDICTORS}")
        if lookahead < 1:
            raise ValueError(f"lookahead must be at least 1 layer, got {lookahead}")

    def __post_init__(self) -> None:
        self.check(self.predictor, self.lookahead)
        self.history = _C.TransitionPredictor(len(self.routers), self.num_experts)
        self._ranks = [[0, 0] for _ in range(self.num_experts)]
        self.clock = LayerClock(self.device)

    def gate_scores(
        self, layer: int, hidden_states: torch.Tensor
    ) -> list[tuple[int, torch.Tensor]]:
        """Per lookahead layer: [num_experts] scores from its router on this hidden state
        (the highest routing weight any token gives each expert), still on the device."""
        if self.predictor == "history":
            return []
        scored = []
        for target in range(layer + 1, min(layer + 1 + self.lookahead, len(self.routers))):
            router = self.routers[target]
            choice = router_choice(router, hidden_states) if router is not None else None
            if choice is None:
                continue
            index, weights = choice
            scores = torch.zeros(self.num_experts, device=index.device)
            scores.scatter_reduce_(0, index.flatten(), weights.flatten().float(), "amax")
            scored.append((target, scores))
        return scored

    def layer_ends(self) -> None:
        """A layer's experts forward begins: the compute since the last layer's experts were
        ready ends here (before this layer reads its routing)."""
        self.clock.stop()

    def observe(self, layer: int, chosen: list[int], tokens: int) -> None:
        """The layer has read its routing: it chose `chosen` for `tokens` tokens."""
        seconds = self.clock.seconds()
        if seconds is not None and layer > 0:
            self.layer_seconds = (
                seconds if not self.layer_seconds else 0.8 * self.layer_seconds + 0.2 * seconds
            )
        ranked = self._ranked.pop(layer, [])
        if tokens == 1:
            for rank, expert in enumerate(ranked):
                self._ranks[rank][0] += 1
                self._ranks[rank][1] += expert in chosen
        self._tokens = tokens
        if layer == 0 and tokens > 1:  # a prefill: a new request
            self.history.new_request()
        self.history.observe(layer, chosen)

    def prefetch(self, layer: int, gate: list[tuple[int, list[float]]]) -> None:
        """Once `layer`'s experts are ready: merges the scores for the next layers and
        prefetches the best that are worth a copy."""
        self.clock.start()
        usable = min(self.num_experts, self.experts_per_token * self._tokens)
        if self.predictor != "gate":
            # Request-level locality: what this request uses at this layer, it will likely
            # use again the next time the layer runs. A prediction (no copy) that keeps
            # these experts from being the first victims.
            again = self.history.predict(layer, usable)
            if again:
                self.cache.predict(layer, [e for e, _ in again], [s for _, s in again])
        merged: dict[int, dict[int, float]] = {target: {} for target, _ in gate}
        for target, scores in gate:
            merged[target] = {e: s for e, s in enumerate(scores) if s > 0.0}
        nxt = layer + 1
        if self.predictor != "gate" and nxt < len(self.routers):
            weight = 1.0 if self.predictor == "history" else HISTORY_WEIGHT
            candidates = merged.setdefault(nxt, {})
            for expert, score in self.history.predict(nxt, self.num_experts):
                candidates[expert] = candidates.get(expert, 0.0) + weight * score
        for target in sorted(merged):
            ranked = sorted(merged[target].items(), key=lambda item: (-item[1], item[0]))[:usable]
            self._ranked[target] = [e for e, _ in ranked]
            worth = [c for rank, c in enumerate(ranked) if self.worth(rank, target - layer)]
            if worth:
                self.cache.prefetch(target, [e for e, _ in worth], [s for _, s in worth])

    def worth(self, rank: int, distance: int) -> bool:
        """Whether prefetching the candidate at `rank` for a layer `distance` ahead pays on
        average. With p how often that rank was chosen (measured, from even odds) and h the
        share of a copy the compute before that layer can hide: used, it saves h of a copy;
        unused, it costs the 1 - h of a copy the link spends on it with demand copies
        waiting. Worth it when p h >= (1 - p)(1 - h)."""
        if math.isinf(self.link_bytes_per_second) or not self.layer_seconds:
            return True
        copy_seconds = self.cache.slot_bytes / self.link_bytes_per_second
        hidden = min(1.0, distance * self.layer_seconds / copy_seconds)
        seen, used = self._ranks[rank]
        p = (used + 1) / (seen + 2)
        return p * hidden >= (1 - p) * (1 - hidden)
