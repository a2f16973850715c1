"""Rows per pass chosen from free memory (injected figures), the out-of-memory halving retry,
and results that do not depend on the rows per pass."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from run_helpers import node_objective

import strace_lens as sl
from strace_lens import memory
from strace_lens.hygiene import model_untouched
from strace_lens.search import objective as objective_module
from strace_lens.tiny_model import tiny_model

PROMPTS = ["hello there friend", "a b", "the quick brown fox jumps over", "one two three"]


class FakeModel:
    """Just what the estimate reads: the config and the parameters' dtype."""

    cfg = SimpleNamespace(d_model=64, n_heads=4, d_head=16, d_mlp=256, n_layers=2, d_vocab=1000)

    def parameters(self):
        yield torch.zeros(1, dtype=torch.float32)


def test_row_bytes_by_hand():
    # per token and layer: 8*64 + 4*4*16 + 2*4*10 + 4*256 = 1872 floats; 10 tokens, 2 layers,
    # 4 bytes; plus 6 vocab-sized float32 rows
    assert memory.row_bytes(FakeModel(), 10) == 10 * 2 * 1872 * 4 + 6 * 1000 * 4 == 173760


@pytest.mark.parametrize(
    "device,free,rows",
    [
        ("cpu", 10_000_000, 14),  # 10 MB * 1/2 / 2 = 2.5 MB over 173760 bytes a row
        ("cuda", 10_000_000, 14),
        ("cpu", None, 204),  # unknown memory: the CPU cap, 2048 tokens / 10
        ("cuda", None, 6553),  # 65536 tokens / 10
        ("cpu", 10**12, 204),  # plenty of memory: the cap
        ("cuda", 10**12, 6553),
        ("cuda", 5_000_000, 7),
        ("cpu", 1000, 1),  # too little for one row: one row (the retry reports the rest)
    ],
)
def test_rows_per_pass_from_an_injected_memory_figure(device, free, rows):
    assert memory.rows_per_pass(FakeModel(), 10, torch.device(device), free) == rows


def test_meminfo_available_is_read_in_kilobytes(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  2000 kB\nMemFree:  300 kB\nMemAvailable:  1500 kB\n")
    assert memory._meminfo_available(meminfo) == 1500 * 1024
    assert memory._meminfo_available(tmp_path / "missing") is None
    meminfo.write_text("MemTotal:  2000 kB\n")
    assert memory._meminfo_available(meminfo) is None


def test_cpu_free_bytes_is_read_here():
    free = memory.free_bytes(torch.device("cpu"))
    assert free is None or free > 0


def test_out_of_memory_errors_are_recognised():
    assert memory.is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert memory.is_out_of_memory(RuntimeError("[enforce fail] can't allocate memory: 8 GB"))
    assert memory.is_out_of_memory(MemoryError())
    assert not memory.is_out_of_memory(RuntimeError("shape mismatch"))
    assert not memory.is_out_of_memory(ValueError("out of memory"))


def _objective(model, batch_size=None):
    return node_objective(model, PROMPTS, "mean", batch_size)


@pytest.fixture
def tiny():
    return tiny_model()


def test_objective_chooses_from_the_device_memory(tiny, monkeypatch):
    with model_untouched(tiny):
        objective = _objective(tiny)
        width = int(objective.batch.tokens.shape[1])
        assert width == 31  # the longest prompt, with BOS
        # 40 rows' estimate free: half of it, over the safety factor 2, holds 10 rows
        free = 40 * memory.row_bytes(tiny, width)
        monkeypatch.setattr(memory, "free_bytes", lambda device: free)
        assert objective.rows_per_pass == 10  # the CPU cap would allow 2048 // 31 = 66
        assert _objective(tiny, batch_size=3).rows_per_pass == 3


def _failing_forward(monkeypatch, limit, error="CUDA out of memory. Tried to allocate"):
    """forward_logprobs raising an out-of-memory error for batches above ``limit`` rows."""
    real = objective_module.forward_logprobs
    seen: list[int] = []

    def forward(model, batch, hooks, *args, **kwargs):
        seen.append(batch.batch_size)
        if batch.batch_size > limit:
            raise RuntimeError(error)
        return real(model, batch, hooks, *args, **kwargs)

    monkeypatch.setattr(objective_module, "forward_logprobs", forward)
    return seen


def test_out_of_memory_halves_the_rows_and_gives_the_same_values(tiny, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    with model_untouched(tiny):
        n = len(sl.NodeGraph.from_model(tiny))
        masks = (torch.rand(12, n, generator=gen) < 0.6).float()
        prompt = torch.arange(4).repeat(3)
        want = _objective(tiny, batch_size=3).kl(masks, prompt)
        objective = _objective(tiny, batch_size=12)
        seen = _failing_forward(monkeypatch, limit=3)
        got = objective.kl(masks, prompt)
    assert seen[:3] == [12, 6, 3]  # halved twice, then every pass at 3 rows
    assert set(seen[2:]) == {3} and objective.rows_per_pass == 3
    assert torch.equal(got, want)


def test_out_of_memory_in_a_gradient_pass_gives_the_same_gradient(tiny, monkeypatch):
    gen = torch.Generator().manual_seed(1)
    with model_untouched(tiny):
        n = len(sl.NodeGraph.from_model(tiny))
        base = torch.rand(8, n, generator=gen)
        prompt, weights = torch.arange(4).repeat(2), torch.ones(8)
        grads = []
        for batch_size, limit in ((4, 8), (8, 4)):
            objective = _objective(tiny, batch_size=batch_size)
            if limit < batch_size:
                _failing_forward(monkeypatch, limit=limit)
            m = base.clone().requires_grad_(True)
            kl = objective.kl_backward(m * 1.0, prompt, weights)
            grads.append((kl, m.grad))
            monkeypatch.undo()
    (kl_a, grad_a), (kl_b, grad_b) = grads
    assert grad_a is not None and grad_b is not None
    assert torch.equal(kl_a, kl_b) and torch.equal(grad_a, grad_b)


def test_other_errors_and_a_one_row_out_of_memory_are_raised(tiny, monkeypatch):
    with model_untouched(tiny):
        masks = torch.ones(4, len(sl.NodeGraph.from_model(tiny)))
        objective = _objective(tiny, batch_size=4)
        _failing_forward(monkeypatch, limit=0)
        with pytest.raises(RuntimeError, match="out of memory"):
            objective.kl(masks, torch.arange(4))
        assert objective.rows_per_pass == 1
        monkeypatch.undo()
        _failing_forward(monkeypatch, limit=2, error="shape mismatch")
        with pytest.raises(RuntimeError, match="shape mismatch"):
            _objective(tiny, batch_size=4).kl(masks, torch.arange(4))


def test_trace_results_do_not_depend_on_the_rows_per_pass(tiny):
    def run(batch_size: int | None) -> sl.TraceResult:
        result = sl.trace(
            tiny, PROMPTS, [1, 3, 8, 15], "mean", steps=3, progress=False, batch_size=batch_size
        )
        assert isinstance(result, sl.TraceResult)
        return result

    default = run(None)
    for batch_size in (1, 5):
        other = run(batch_size)
        assert torch.equal(other.masks, default.masks)
        for key, values in default.metrics.items():
            assert torch.allclose(other.metrics[key], values, rtol=1e-5, atol=1e-6), key
