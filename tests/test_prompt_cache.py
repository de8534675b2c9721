"""The prompt cache: its bounds and counters, a synthetic:tiny pipeline using it (a hit gives the miss's image, bit for
bit), the model parameters that turn it on, INFO and the Prometheus counters."""

from __future__ import annotations

import importlib
import json
import sys
import types

import numpy as np
import pytest
import torch

import fluxserve
from fluxserve.contract import GenerationRequest
from fluxserve.pipeline import build_pipeline
from fluxserve.prompt_cache import PromptCache
from fluxserve.server.serving import StackService
from fluxserve.stacks import Stack
from fluxserve.weights import parse_source

CPU = torch.device("cpu")
SOURCE = parse_source("synthetic:tiny")


def embeddings(nbytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two tensors of `nbytes` in all, as the text encoders return (sequence, pooled)."""
    return torch.zeros(nbytes - 1, dtype=torch.uint8), torch.zeros(1, dtype=torch.uint8)


def request(prompt: str = "a lighthouse", seed: int = 1) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, seed=seed, steps=2, guidance=3.5, height=64, width=64)


# ------------------------------------------------------------------ the cache alone


def test_the_oldest_entry_goes_when_the_entries_are_full():
    cache = PromptCache(max_entries=2, max_bytes=1000)
    for prompt in ("a", "b", "c"):
        cache.put(prompt, embeddings(10))
    assert "a" not in cache and "b" in cache and "c" in cache
    assert cache.stats() == {"entries": 2, "bytes": 20, "hits": 0, "misses": 0, "evictions": 1}


def test_the_byte_bound_evicts_as_many_as_it_takes():
    cache = PromptCache(max_entries=10, max_bytes=100)
    for prompt in ("a", "b", "c"):
        cache.put(prompt, embeddings(30))
    cache.put("d", embeddings(70))  # 90 + 70 > 100: a and b go (30 + 70 fits)
    assert [prompt for prompt in "abcd" if prompt in cache] == ["c", "d"]
    assert cache.stats() == {"entries": 2, "bytes": 100, "hits": 0, "misses": 0, "evictions": 2}


def test_an_entry_over_the_byte_bound_is_not_kept_and_evicts_nothing():
    cache = PromptCache(max_entries=10, max_bytes=100)
    cache.put("a", embeddings(60))
    assert cache.put("huge", embeddings(101)) is None
    assert "huge" not in cache and "a" in cache
    assert cache.stats() == {"entries": 1, "bytes": 60, "hits": 0, "misses": 0, "evictions": 0}
    assert cache.get("huge") is None  # and asking for it later is a plain miss


def test_hits_and_misses_are_counted_and_a_hit_returns_the_stored_tensors():
    cache = PromptCache(max_entries=4, max_bytes=1000)
    stored = embeddings(10)
    assert cache.get("a") is None
    cache.put("a", stored)
    got = cache.get("a")
    assert got[0] is stored[0] and got[1] is stored[1]
    assert cache.get("b") is None
    assert cache.stats() == {"entries": 1, "bytes": 10, "hits": 1, "misses": 2, "evictions": 0}


def test_a_hit_makes_the_entry_the_most_recently_used():
    cache = PromptCache(max_entries=2, max_bytes=1000)
    cache.put("a", embeddings(10))
    cache.put("b", embeddings(10))
    assert cache.get("a") is not None  # now b is the oldest
    cache.put("c", embeddings(10))
    assert "a" in cache and "b" not in cache and "c" in cache


def test_membership_neither_counts_nor_refreshes():
    cache = PromptCache(max_entries=2, max_bytes=1000)
    cache.put("a", embeddings(10))
    cache.put("b", embeddings(10))
    assert "a" in cache and "z" not in cache
    cache.put("c", embeddings(10))
    assert "a" not in cache  # still the oldest: `in` did not refresh it
    assert cache.stats()["hits"] == cache.stats()["misses"] == 0


def test_storing_a_prompt_again_replaces_it_without_counting_its_bytes_twice():
    cache = PromptCache(max_entries=2, max_bytes=100)
    cache.put("a", embeddings(40))
    cache.put("a", embeddings(60))
    assert cache.stats() == {"entries": 1, "bytes": 60, "hits": 0, "misses": 0, "evictions": 0}


# ------------------------------------------------------------------ the parameters


def test_the_cache_is_off_unless_its_entries_are_set():
    assert PromptCache.from_parameters({}) is None
    assert PromptCache.from_parameters({"prompt_cache_entries": "0", "prompt_cache_mib": "64"}) is None
    cache = PromptCache.from_parameters({"prompt_cache_entries": "8"})
    assert (cache.max_entries, cache.max_bytes) == (8, 256 * 2**20)
    cache = PromptCache.from_parameters({"prompt_cache_entries": " 3 ", "prompt_cache_mib": "2"})
    assert (cache.max_entries, cache.max_bytes) == (3, 2 * 2**20)


@pytest.mark.parametrize("name, value, allowed", [
    ("prompt_cache_entries", "-1", "[0, 10000]"),
    ("prompt_cache_entries", "many", "[0, 10000]"),
    ("prompt_cache_entries", "2.5", "[0, 10000]"),
    ("prompt_cache_entries", "10001", "[0, 10000]"),
    ("prompt_cache_mib", "0", "[1, 65536]"),
    ("prompt_cache_mib", "-5", "[1, 65536]"),
    ("prompt_cache_mib", "lots", "[1, 65536]"),
])
def test_a_bad_parameter_is_a_value_error_naming_it_and_its_range(name, value, allowed):
    parameters = {"prompt_cache_entries": "4", name: value}
    with pytest.raises(ValueError) as error:
        PromptCache.from_parameters(parameters)
    assert f"parameter '{name}'" in str(error.value) and allowed in str(error.value), error.value
    with pytest.raises(ValueError, match=f"parameter '{name}'"):  # the model fails to load, before its weights
        StackService("m", {"weights": "synthetic:tiny", **parameters}, [CPU])


# ------------------------------------------------------------------ a pipeline using it


def prompt_sensitive(stack_pipeline):
    """The pipeline with each transformer linear at 1/sqrt(fan_in), as conftest.unit_scale_pipeline does: with the
    synthetic 0.02 the prompt changes no pixel of a tiny image, so equal images would prove nothing."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in stack_pipeline.pipe.transformer.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, module.in_features ** -0.5, generator=generator)
    return stack_pipeline


def test_a_repeated_prompt_is_a_hit_whatever_the_seed_and_gives_the_image_of_the_miss():
    pipeline = prompt_sensitive(build_pipeline(Stack(), SOURCE, CPU, prompt_cache=PromptCache(4, 2**20)))
    first = pipeline.generate(request(seed=1))
    other_seed = pipeline.generate(request(seed=2))
    other_prompt = pipeline.generate(request("a red fox in snow", seed=1))
    again = pipeline.generate(request(seed=1))
    assert [g.prompt_cache["hit"] for g in (first, other_seed, other_prompt, again)] == [False, True, False, True]
    assert again.prompt_cache == {"hit": True, "entries": 2, "bytes": again.prompt_cache["bytes"], "hits": 2,
                                  "misses": 2, "evictions": 0}
    assert again.prompt_cache["bytes"] > 0
    assert not np.array_equal(other_prompt.image, first.image)  # the prompt shows in the image...
    assert np.array_equal(again.image, first.image)  # ...and the hit's embeddings are the miss's


def test_without_the_cache_nothing_is_cached_or_counted():
    pipeline = build_pipeline(Stack(), SOURCE, CPU)
    generations = [pipeline.generate(request()) for _ in range(2)]
    assert pipeline.prompt_cache is None
    assert [g.prompt_cache for g in generations] == [None, None]


def test_the_warm_up_is_not_cached_or_counted():
    pipeline = build_pipeline(Stack(), SOURCE, CPU, warm_up=request("warm-up"), prompt_cache=PromptCache(4, 2**20))
    assert pipeline.prompt_cache.stats() == {"entries": 0, "bytes": 0, "hits": 0, "misses": 0, "evictions": 0}


@pytest.mark.parametrize("stack", [
    Stack(), Stack(cache="fbcache", cache_threshold=0.3), Stack(cache="teacache", cache_threshold=0.4),
    Stack(quantization="int8", fuse_qkv=True),
], ids=lambda stack: stack.name)
def test_the_denoising_loop_leaves_the_cached_embeddings_as_they_were(stack):
    """What makes storing the encoders' own tensors safe: nothing downstream writes into them."""
    pipeline = build_pipeline(stack, SOURCE, CPU, prompt_cache=PromptCache(4, 2**20))
    with torch.inference_mode():
        stored = pipeline._encode("a lighthouse")
    before = [tensor.clone() for tensor in stored]
    assert pipeline.generate(request("a lighthouse")).prompt_cache["hit"]
    after = pipeline.prompt_cache.get("a lighthouse")
    assert all(a is s for a, s in zip(after, stored))
    assert all(torch.equal(a, b) for a, b in zip(after, before))


# ------------------------------------------------------------------ INFO and metrics


def test_info_reports_the_cache_per_request_and_null_when_off():
    base = {"weights": "synthetic:tiny", "limit_default_size": "64"}
    inputs = {"PROMPT": np.array([b"a lighthouse"], dtype=np.object_), "SEED": np.array([1], dtype=np.int64),
              "STEPS": np.array([2], dtype=np.int32)}
    service = StackService("cached", {**base, "prompt_cache_entries": "4"}, [CPU], notify=lambda message: None)
    infos = [json.loads(service.infer(inputs, {"INFO"})["INFO"][0]) for _ in range(2)]
    # The warm-up ran before the cache was given: the first request is the first miss.
    assert infos[0]["prompt_cache"] == {"hit": False, "entries": 1, "bytes": infos[0]["prompt_cache"]["bytes"],
                                        "hits": 0, "misses": 1, "evictions": 0}
    assert infos[1]["prompt_cache"] == {**infos[0]["prompt_cache"], "hit": True, "hits": 1}
    off = StackService("uncached", base, [CPU], notify=lambda message: None)
    assert json.loads(off.infer(inputs, {"INFO"})["INFO"][0])["prompt_cache"] is None


class FakeCounter:
    def __init__(self) -> None:
        self.value = 0

    def increment(self, by: int) -> None:
        self.value += by


class FakeMetricFamily:
    COUNTER = "counter"

    def __init__(self, name: str, description: str, kind: str) -> None:
        self.name = name
        self.metrics: dict[str, FakeCounter] = {}

    def Metric(self, labels: dict) -> FakeCounter:  # noqa: N802 (pb_utils' name)
        return self.metrics.setdefault(labels["model"], FakeCounter())


def test_prometheus_counts_hits_and_misses_per_model_and_nothing_when_off(monkeypatch):
    pb_utils = types.ModuleType("triton_python_backend_utils")
    pb_utils.MetricFamily = FakeMetricFamily
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb_utils)
    monkeypatch.setitem(sys.modules, "fluxserve.triton_model", None)  # restored (removed) after the test...
    monkeypatch.delitem(sys.modules, "fluxserve.triton_model")  # ...and imported here with the fake pb_utils
    monkeypatch.setattr(fluxserve, "triton_model", None, raising=False)
    metrics = importlib.import_module("fluxserve.triton_model").PromptCacheMetrics("m")
    hits, misses = (family.metrics["m"] for family in metrics.families)
    assert [family.name for family in metrics.families] == ["fluxserve_prompt_cache_hits_total",
                                                            "fluxserve_prompt_cache_misses_total"]
    pipeline = build_pipeline(Stack(), SOURCE, CPU, prompt_cache=PromptCache(4, 2**20))
    for prompt in ("a", "b", "a", "a"):
        metrics.observe(None, pipeline.generate(request(prompt)))
    assert (hits.value, misses.value) == (2, 2)
    metrics.observe(None, build_pipeline(Stack(), SOURCE, CPU).generate(request("a")))  # no cache
    assert (hits.value, misses.value) == (2, 2)
