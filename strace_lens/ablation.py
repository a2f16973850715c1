"""What a removed node's activation is replaced with: zero, or its mean over reference prompts.

``MeanAblation`` stores, for every attention head, the mean of its ``hook_z`` slice
(``[d_head]``), and for every MLP the mean of ``hook_mlp_out`` (``[d_model]``). The mean is
taken over every *real* token position of every reference prompt (padding excluded; the BOS
position included, as the model always sees it). With ``per_position=True`` it is taken
separately for each position index within the prompt (position 0 is the BOS token); a prompt
longer than every reference prompt falls back to the all-position mean beyond that length.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from strace_lens.atomic import written_file
from strace_lens.graph import NodeGraph
from strace_lens.hygiene import check_hook_points, model_untouched
from strace_lens.inputs import Prompts, TokenBatch, tokenize

FORMAT_VERSION = 1


class Ablation:
    """Base class: supplies replacement activations for removed nodes."""

    name: str = "ablation"

    def attn_value(
        self, layer: int, batch: TokenBatch
    ) -> Float[Tensor, "#batch #pos head d_head"] | None:
        """Replacement for ``blocks.{layer}.attn.hook_z`` (None means zero)."""
        return None

    def mlp_value(
        self, layer: int, batch: TokenBatch
    ) -> Float[Tensor, "#batch #pos d_model"] | None:
        """Replacement for ``blocks.{layer}.hook_mlp_out`` (None means zero)."""
        return None

    def check_model(self, model: Any) -> None:
        """Raise if these replacement values were made for a different model."""

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


class ZeroAblation(Ablation):
    """Replace a removed node's activation by zero."""

    name = "zero"

    def __repr__(self) -> str:
        return "ZeroAblation()"


class MeanAblation(Ablation):
    """Replace a removed node's activation by its mean over reference prompts."""

    name = "mean"

    def __init__(
        self,
        attn: Float[Tensor, "layer head d_head"],
        mlp: Float[Tensor, "layer d_model"],
        attn_by_pos: Float[Tensor, "layer pos head d_head"] | None = None,
        mlp_by_pos: Float[Tensor, "layer pos d_model"] | None = None,
        n_prompts: int = 0,
        n_tokens: int = 0,
        model_info: dict[str, Any] | None = None,
    ) -> None:
        if attn.ndim != 3 or mlp.ndim != 2 or attn.shape[0] != mlp.shape[0]:
            raise ValueError(
                f"MeanAblation expects attn [layer, head, d_head] and mlp [layer, d_model], got "
                f"{tuple(attn.shape)} and {tuple(mlp.shape)}."
            )
        self.attn = attn
        self.mlp = mlp
        self.attn_by_pos = attn_by_pos
        self.mlp_by_pos = mlp_by_pos
        self.n_prompts = n_prompts
        self.n_tokens = n_tokens
        self.model_info = model_info or {}

    @property
    def per_position(self) -> bool:
        return self.attn_by_pos is not None

    def __repr__(self) -> str:
        return (
            f"MeanAblation(layers={self.attn.shape[0]}, heads={self.attn.shape[1]}, "
            f"per_position={self.per_position}, n_prompts={self.n_prompts})"
        )

    # -- building --------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def from_prompts(
        cls,
        model: Any,
        prompts: Prompts,
        per_position: bool = False,
        batch_size: int = 16,
        progress: bool = True,
        *,
        attention_mask: Tensor | None = None,
    ) -> MeanAblation:
        """Mean of every node's activation over the real tokens of ``prompts``.

        Args:
            model: a TransformerBridge / HookedTransformer.
            prompts: reference prompts (strings or a token tensor).
            per_position: also keep one mean per position index within the prompt.
            batch_size: prompts per forward pass.
            progress: show a progress bar.
            attention_mask: with a token tensor, 1 for real tokens and 0 for padding (left
                or right); padding never enters a mean.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        graph = NodeGraph.from_model(model)
        check_hook_points(model, graph)
        full = tokenize(model, prompts, attention_mask)
        n_layers, n_heads = graph.n_layers, graph.n_heads
        # Per-position tables span the longest prompt's real tokens (not the padded width, which
        # would leave never-seen positions holding a zero "mean").
        width = int(full.attention_mask.sum(-1).max())
        sums_attn: list[Tensor | None] = [None] * n_layers
        sums_mlp: list[Tensor | None] = [None] * n_layers
        # per position sums are kept on the prompt's own position index (row-local)
        pos_attn: list[Tensor | None] = [None] * n_layers
        pos_mlp: list[Tensor | None] = [None] * n_layers
        pos_count = torch.zeros(width, dtype=torch.float64)
        starts = range(0, full.batch_size, batch_size)
        bar = tqdm(starts, desc="mean activations", disable=not progress, unit="batch")
        with model_untouched(model):
            for start in bar:
                batch = full.select(range(start, min(start + batch_size, full.batch_size)))
                batch = batch.trimmed()
                weights = batch.attention_mask.to(torch.float64)  # [b, p]
                local = batch.real_positions
                onehot = torch.nn.functional.one_hot(local, width).to(torch.float64)
                onehot = onehot * weights[..., None]  # [b, p, width]
                pos_count += onehot.sum((0, 1)).cpu()

                def accumulate(
                    act: Tensor,
                    hook: Any,
                    sums: list[Tensor | None],
                    by_pos: list[Tensor | None],
                    weights: Tensor = weights,
                    onehot: Tensor = onehot,
                ) -> None:
                    layer = int(hook.name.split(".")[1])
                    a = act.detach().to(torch.float64)
                    flat = a.reshape(a.shape[0], a.shape[1], -1)
                    # with a device_map, each block's activations are on that block's device
                    weights = weights.to(a.device)
                    total = torch.einsum("bp,bpd->d", weights, flat).reshape(a.shape[2:]).cpu()
                    prev = sums[layer]
                    sums[layer] = total if prev is None else prev + total
                    if per_position:
                        pos_sum = torch.einsum("bpw,bpd->wd", onehot.to(a.device), flat)
                        pos_sum = pos_sum.reshape(width, *a.shape[2:]).cpu()
                        prev_pos = by_pos[layer]
                        by_pos[layer] = pos_sum if prev_pos is None else prev_pos + pos_sum

                hooks = []
                for layer in range(n_layers):
                    hooks.append(
                        (
                            f"blocks.{layer}.attn.hook_z",
                            lambda act, hook: accumulate(act, hook, sums_attn, pos_attn),
                        )
                    )
                    hooks.append(
                        (
                            f"blocks.{layer}.hook_mlp_out",
                            lambda act, hook: accumulate(act, hook, sums_mlp, pos_mlp),
                        )
                    )
                with model.hooks(fwd_hooks=hooks):
                    model(batch.tokens, **batch.model_kwargs())
        n_tokens = float(full.attention_mask.sum())
        dtype = next(model.parameters()).dtype
        attn = torch.stack([s for s in sums_attn if s is not None]) / n_tokens
        mlp = torch.stack([s for s in sums_mlp if s is not None]) / n_tokens
        if attn.shape[:2] != (n_layers, n_heads):
            raise RuntimeError(f"Unexpected hook_z shape {tuple(attn.shape)}.")
        attn_by_pos = mlp_by_pos = None
        if per_position:
            denom = pos_count.clamp(min=1)
            attn_by_pos = torch.stack([s for s in pos_attn if s is not None])
            attn_by_pos = attn_by_pos / denom[None, :, None, None]
            mlp_by_pos = torch.stack([s for s in pos_mlp if s is not None]) / denom[None, :, None]
            attn_by_pos = attn_by_pos.to(dtype)
            mlp_by_pos = mlp_by_pos.to(dtype)
        from strace_lens.models import model_identity

        return cls(
            attn.to(dtype),
            mlp.to(dtype),
            attn_by_pos,
            mlp_by_pos,
            n_prompts=full.batch_size,
            n_tokens=int(n_tokens),
            model_info=model_identity(model),
        )

    # -- use -------------------------------------------------------------------------------
    def _by_position(self, table: Tensor, overall: Tensor, batch: TokenBatch) -> Tensor:
        """Gather per-position means for every (row, position); beyond the table, overall."""
        local = batch.real_positions.to(table.device)
        covered = table.shape[0]
        idx = local.clamp(max=covered - 1)
        values = table[idx]  # [b, p, ...]
        beyond = (local >= covered).reshape(*local.shape, *([1] * (values.ndim - 2)))
        return torch.where(beyond, overall.to(values.dtype), values)

    def attn_value(self, layer: int, batch: TokenBatch) -> Tensor:
        if self.attn_by_pos is not None:
            return self._by_position(self.attn_by_pos[layer], self.attn[layer], batch)
        return self.attn[layer][None, None]

    def mlp_value(self, layer: int, batch: TokenBatch) -> Tensor:
        if self.mlp_by_pos is not None:
            return self._by_position(self.mlp_by_pos[layer], self.mlp[layer], batch)
        return self.mlp[layer][None, None]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> MeanAblation:
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype or t.dtype)

        attn, mlp = move(self.attn), move(self.mlp)
        assert attn is not None and mlp is not None
        return MeanAblation(
            attn,
            mlp,
            move(self.attn_by_pos),
            move(self.mlp_by_pos),
            self.n_prompts,
            self.n_tokens,
            self.model_info,
        )

    def check_model(self, model: Any) -> None:
        cfg = model.cfg
        expected = (int(cfg.n_layers), int(cfg.n_heads))
        if tuple(self.attn.shape[:2]) != expected or self.mlp.shape[1] != int(cfg.d_model):
            raise ValueError(
                f"This MeanAblation was computed for a model with {self.attn.shape[0]} layers, "
                f"{self.attn.shape[1]} heads and d_model={self.mlp.shape[1]}, but the model has "
                f"{expected[0]} layers, {expected[1]} heads and d_model={cfg.d_model}: compute "
                "it again with MeanAblation.from_prompts(model, prompts)."
            )

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "per_position": self.per_position,
            "n_prompts": self.n_prompts,
            "n_tokens": self.n_tokens,
        }

    def tensor_sha256(self) -> str:
        """SHA-256 of the tensors (names, dtypes, shapes and bytes), not of any file.

        A ``.safetensors`` file's bytes are no fingerprint: safetensors writes the metadata
        keys in an order that changes from process to process, so the same tensors saved
        twice give two file hashes. This hash is the same whenever the tensors are.
        """
        digest = hashlib.sha256()
        tables = (
            ("attn", self.attn),
            ("mlp", self.mlp),
            ("attn_by_pos", self.attn_by_pos),
            ("mlp_by_pos", self.mlp_by_pos),
        )
        for name, t in tables:
            if t is None:
                continue
            flat = t.detach().to("cpu").contiguous()
            digest.update(f"{name}:{flat.dtype}:{tuple(flat.shape)};".encode())
            digest.update(flat.reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    # -- persistence -----------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write to a ``.safetensors`` file (atomically); metadata goes in its header."""
        path = Path(path)
        tensors = {"attn": self.attn.contiguous().cpu(), "mlp": self.mlp.contiguous().cpu()}
        if self.attn_by_pos is not None and self.mlp_by_pos is not None:
            tensors["attn_by_pos"] = self.attn_by_pos.contiguous().cpu()
            tensors["mlp_by_pos"] = self.mlp_by_pos.contiguous().cpu()
        meta = {
            "format": "strace-lens/mean-ablation",
            "version": str(FORMAT_VERSION),
            "n_prompts": str(self.n_prompts),
            "n_tokens": str(self.n_tokens),
            "model": json.dumps(self.model_info),
        }
        with written_file(path) as tmp:
            save_file(tensors, tmp, metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> MeanAblation:
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"No mean-ablation file at {path}.")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))
        except Exception as err:  # safetensors raises several types for damaged files
            raise ValueError(
                f"{path} is not a readable mean-ablation file ({err}); compute it again with "
                "MeanAblation.from_prompts(...).save(path)."
            ) from err
        if meta.get("format") != "strace-lens/mean-ablation":
            raise ValueError(f"{path} is not a strace-lens mean-ablation file.")
        return cls(
            tensors["attn"],
            tensors["mlp"],
            tensors.get("attn_by_pos"),
            tensors.get("mlp_by_pos"),
            n_prompts=int(meta.get("n_prompts", 0)),
            n_tokens=int(meta.get("n_tokens", 0)),
            model_info=json.loads(meta.get("model", "{}")),
        )


def resolve_ablation(
    ablation: Ablation | str | None, model: Any, prompts: Prompts | None = None, **kwargs: Any
) -> Ablation:
    """``None``/"mean" -> mean over ``prompts``; "zero" -> zero; an Ablation is checked."""
    if ablation is None or ablation == "mean":
        if prompts is None:
            raise ValueError("Mean ablation needs reference prompts.")
        return MeanAblation.from_prompts(model, prompts, **kwargs)
    if ablation == "zero":
        return ZeroAblation()
    if isinstance(ablation, Ablation):
        ablation.check_model(model)
        return ablation
    raise ValueError(
        f"Unknown ablation {ablation!r}: use 'mean', 'zero', ZeroAblation() or "
        "MeanAblation.from_prompts(model, prompts)."
    )


__all__: Sequence[str] = ["Ablation", "MeanAblation", "ZeroAblation", "resolve_ablation"]
