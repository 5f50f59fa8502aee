"""Property tests: random access sequences, capacities and predictions for every policy.

Each run goes through the native cache and through a small reference model of the policy
written from its definition (eviction_policy.h); hits and residency must agree at every
step, capacity is never exceeded, and Belady's demand misses bound every other policy's.
"""

from __future__ import annotations

import math

import expertflow as ef
import hypothesis.strategies as st
from hypothesis import given, settings


class Reference:
    """The cache as the policies define it: empty slots first (lowest index), then the
    policy's choice among the slots the request does not use; ties to the lowest slot."""

    def __init__(self, layers, experts, slots, policy, static=(), future=()):
        self.layers, self.experts, self.policy = layers, experts, policy
        self.slot = [None] * slots
        self.last_use = [0] * slots
        self.tick = 0
        self.count: dict[int, int] = {}
        self.last_access: dict[int, int] = {}
        self.accesses = 0
        self.static = {layer * experts + e for layer, e in static}
        self.future = [[layer * experts + e for e in chosen] for layer, chosen in future]
        self.step = 0
        self.confidence: dict[int, float] = {}
        self.current = -1

    def distance(self, layer):
        return (layer - self.current - 1) % self.layers + 1

    def rank(self, i):
        key = self.slot[i]
        if self.policy == "lru":
            return (self.last_use[i],)
        if self.policy == "lfu":
            return (self.count.get(key, 0), self.last_access.get(key, 0))
        if self.policy == "static":
            return (self.last_use[i],)
        if self.policy == "expertflow":
            if key not in self.confidence:
                return (0, 0, 0.0, self.last_use[i])
            return (1, -self.distance(key // self.experts), self.confidence[key], self.last_use[i])
        later = [s for s in range(self.step + 1, len(self.future)) if key in self.future[s]]
        return (-(later[0] if later else math.inf),)  # belady: farthest next use first

    def acquire(self, layer, chosen) -> int:
        keys = [layer * self.experts + e for e in chosen]
        resident = {k: i for i, k in enumerate(self.slot) if k is not None}
        hits = [k for k in keys if k in resident]
        taken = {resident[k] for k in hits}
        placed = {}
        for k in keys:
            if k in resident:
                continue
            empty = [i for i, s in enumerate(self.slot) if s is None and i not in taken]
            if empty:
                victim = empty[0]
            else:
                candidates = [
                    i
                    for i, s in enumerate(self.slot)
                    if i not in taken and (self.policy != "static" or s not in self.static)
                ]
                victim = min(candidates, key=lambda i: (self.rank(i), i))
            taken.add(victim)
            placed[k] = victim
            self.slot[victim] = k
        for k in keys:  # the policy hears of the access after its victims are chosen
            self.count[k] = self.count.get(k, 0) + 1
            self.accesses += 1
            self.last_access[k] = self.accesses
        for k in hits + [k for k in keys if k in placed]:  # hits tick first, then misses
            self.tick += 1
            self.last_use[resident.get(k, placed.get(k))] = self.tick
        self.current = layer
        for e in range(self.experts):
            self.confidence.pop(layer * self.experts + e, None)
        self.step += 1
        if self.policy == "static":  # others are dropped on release
            for i, s in enumerate(self.slot):
                if s in keys and s not in self.static:
                    self.slot[i] = None
        return len(hits)

    def predict(self, layer, chosen, scores):
        for e, score in zip(chosen, scores):
            self.confidence[layer * self.experts + e] = score

    def residency(self):
        return sorted(k for k in self.slot if k is not None)


@st.composite
def workloads(draw):
    layers = draw(st.integers(1, 3))
    experts = draw(st.integers(2, 6))
    slots = draw(st.integers(1, layers * experts))
    most = min(slots, experts, 3)
    ops = []
    for _ in range(draw(st.integers(1, 40))):
        layer = draw(st.integers(0, layers - 1))
        chosen = draw(st.lists(st.integers(0, experts - 1), min_size=1, max_size=most, unique=True))
        if draw(st.integers(0, 4)) == 0:
            scores = draw(
                st.lists(st.floats(0, 1, width=32), min_size=len(chosen), max_size=len(chosen))
            )
            ops.append(("predict", layer, chosen, scores))
        else:
            ops.append(("acquire", layer, chosen, None))
    static_size = draw(st.integers(0, max(0, slots - most)))
    pairs = [(layer, e) for layer in range(layers) for e in range(experts)]
    static = draw(st.permutations(pairs))[:static_size]
    return layers, experts, slots, ops, static


def run(policy, layers, experts, slots, ops, static):
    acquires = [(layer, chosen) for kind, layer, chosen, _ in ops if kind == "acquire"]
    pool = ef.HostPool(ef.ExpertLayout(layers, experts, 256))
    options = {"static_experts": static} if policy == "static" else {}
    if policy == "belady":
        options["future"] = acquires
    reference = Reference(layers, experts, slots, policy, static, acquires)
    native_misses = 0
    with ef.ExpertCache(pool, slots=slots, policy=policy, **options) as cache:
        for kind, layer, chosen, scores in ops:
            if kind == "predict":
                cache.predict(layer, chosen, scores)
                reference.predict(layer, chosen, scores)
                continue
            before = cache.stats()["hits"]
            cache.acquire(layer, chosen)
            cache.release(layer, chosen)
            hits = cache.stats()["hits"] - before
            assert hits == reference.acquire(layer, chosen), (policy, layer, chosen)
            native_misses += len(chosen) - hits
            resident = [
                layer * experts + e
                for layer in range(layers)
                for e in range(experts)
                if cache.resident(layer, e)
            ]
            assert len(resident) <= slots
            assert resident == reference.residency(), (policy, layer, chosen)
    return native_misses


@settings(max_examples=60, deadline=None)
@given(workloads())
def test_every_policy_matches_its_reference_and_belady_bounds_them(workload):
    misses = {
        policy: run(policy, *workload)
        for policy in ("lru", "lfu", "static", "expertflow", "belady")
    }
    assert all(misses["belady"] <= m for m in misses.values()), misses


@settings(max_examples=30, deadline=None)
@given(workloads(), st.integers(0, 1000))
def test_pinned_experts_are_never_evicted_by_prefetches(workload, seed):
    layers, experts, slots, ops, _ = workload
    pool = ef.HostPool(ef.ExpertLayout(layers, experts, 256))
    with ef.ExpertCache(pool, slots=slots, policy="expertflow") as cache:
        for _, layer, chosen, _ in ops:
            cache.acquire(layer, chosen)
            cache.prefetch((layer + seed) % layers, list(range(experts)))
            assert all(cache.resident(layer, e) for e in chosen)  # pinned until released
            held = sum(cache.resident(m, e) for m in range(layers) for e in range(experts))
            assert held <= slots
            cache.release(layer, chosen)
