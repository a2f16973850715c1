"""Models larger than one device (``device_map``) and half precision (``dtype``).

What runs where: a CPU has one torch device, so on a machine without two GPUs the device_map
tests check that a per-block map (every block on "cpu") loads through the same path and gives
exactly the single-device results, and that bf16/fp16 forwards return float32 log-probs and
metrics. The split over two devices is tested only where two CUDA devices exist (skipped
otherwise): blocks alternate between cuda:0 and cuda:1, and masked forwards, the mean ablation
and a traced run equal the single-GPU ones.
"""

from __future__ import annotations

import pytest
import torch

from strace_lens import trace
from strace_lens.ablation import MeanAblation
from strace_lens.cli import main
from strace_lens.graph import NodeGraph
from strace_lens.masked_forward import run_with_mask
from strace_lens.metrics import kl_divergence
from strace_lens.models import load_model, resolve_dtype

PROMPTS = ["The cat sat on the", "one two three four", "Paris is the capital of"]
N_LAYERS = 4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random Llama-shaped Hugging Face checkpoint (with the byte tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from strace_lens.tiny_model import byte_tokenizer

    folder = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(
        vocab_size=259,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return str(folder)


def block_map(devices: list[str | int]) -> dict[str, str | int]:
    """Embedding on the first device, block i on devices[i % len], head on the last."""
    placement: dict[str, str | int] = {"model.embed_tokens": devices[0]}
    for i in range(N_LAYERS):
        placement[f"model.layers.{i}"] = devices[i % len(devices)]
    placement.update({"model.norm": devices[-1], "model.rotary_emb": devices[0]})
    placement["lm_head"] = devices[-1]
    return placement


def masked_outputs(model) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of random masks with the mean ablation, and the ablation's own table."""
    graph = NodeGraph.from_model(model)
    mask = torch.rand(len(PROMPTS), len(graph), generator=torch.Generator().manual_seed(1))
    ablation = MeanAblation.from_prompts(model, PROMPTS, progress=False)
    return run_with_mask(model, PROMPTS, mask, ablation).cpu(), ablation.mlp.cpu()


def test_dtype_names_and_device_or_map(checkpoint):
    assert resolve_dtype(None) == torch.float32
    assert resolve_dtype("bfloat16") == torch.bfloat16
    assert resolve_dtype(torch.float16) == torch.float16
    with pytest.raises(ValueError, match="Unknown dtype 'float64'"):
        resolve_dtype("float64")
    with pytest.raises(ValueError, match="not both"):
        load_model(checkpoint, device="cpu", device_map="auto")


def test_a_per_block_device_map_gives_the_single_device_results(checkpoint):
    plain = load_model(checkpoint, device="cpu")
    mapped = load_model(checkpoint, device_map=block_map(["cpu"]))
    assert str(mapped.cfg.device) == "cpu"
    logp_plain, mean_plain = masked_outputs(plain)
    logp_mapped, mean_mapped = masked_outputs(mapped)
    assert torch.equal(logp_plain, logp_mapped) and torch.equal(mean_plain, mean_mapped)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_forwards_give_float32_logprobs_close_to_fp32(checkpoint, dtype):
    full, _ = masked_outputs(load_model(checkpoint, device="cpu"))
    model = load_model(checkpoint, device="cpu", dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {getattr(torch, dtype)}
    half, _ = masked_outputs(model)
    assert half.dtype == torch.float32 and bool(torch.isfinite(half).all())
    kl = kl_divergence(full, half)
    assert kl.dtype == torch.float32
    # bf16 keeps 8 mantissa bits, fp16 11: both are near, neither equal, to fp32
    assert 0 < float(kl.max()) < (1e-2 if dtype == "bfloat16" else 1e-3)


def test_cli_dtype_and_device_map_flags(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    base = ["trace", "--model", "native:tiny", "--prompts", str(tmp_path / "p.txt")]
    base += ["--out", str(tmp_path / "run"), "--sizes", "1", "15", "--option", "steps=2"]
    base += ["--quiet", "--no-html"]
    for extra, said in (
        (["--device-map", "auto"], "--device-map needs a Hugging Face model"),
        (["--device-map", "{bad", "--model", "x"], "not valid JSON"),
        (["--device-map", "auto", "--device", "cpu", "--model", "x"], "not both"),
    ):
        assert main([*base, *extra]) == 2, extra
        assert said in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:  # argparse's own choices check
        main([*base, "--dtype", "float64"])
    assert stop.value.code == 2 and "invalid choice" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert main([*base, "--dtype", "bfloat16", "--device", "cpu"]) == 0
    assert "3 prompt(s)" in capsys.readouterr().out


two_gpus = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2,
    reason="needs two CUDA devices (a CPU has one torch device)",
)


@two_gpus
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_blocks_split_over_two_gpus_give_the_single_gpu_results(checkpoint, dtype):
    one = load_model(checkpoint, device="cuda:0", dtype=dtype)
    two = load_model(checkpoint, device_map=block_map([0, 1]), dtype=dtype)
    devices = {p.device for p in two.parameters()}
    assert devices == {torch.device("cuda", 0), torch.device("cuda", 1)}
    logp_one, mean_one = masked_outputs(one)
    logp_two, mean_two = masked_outputs(two)
    torch.testing.assert_close(logp_two, logp_one, rtol=0, atol=1e-5)
    torch.testing.assert_close(mean_two, mean_one, rtol=0, atol=1e-6)
    options = dict(sizes=[1, 3, 10], steps=3, seed=0)
    a, b = trace(one, PROMPTS, **options), trace(two, PROMPTS, **options)
    assert torch.equal(a.masks, b.masks)
    torch.testing.assert_close(b.metrics["kl"], a.metrics["kl"], rtol=0, atol=1e-5)
