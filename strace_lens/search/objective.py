"""The objective every search method optimises: KL(P_full || P_sub) of a node mask on a prompt.

``SubgraphObjective`` holds one set of prompts, their full-model distributions and the
ablation, and scores many (prompt, mask) rows at once in chunks of ``batch_size`` rows, with
or without a gradient to the masks. All methods (learned masks and baselines) go through it,
so they are measured the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from strace_lens import memory
from strace_lens.ablation import Ablation
from strace_lens.graph import NodeGraph
from strace_lens.hygiene import model_device
from strace_lens.inputs import TokenBatch
from strace_lens.masked_forward import forward_logprobs, hooked_layers, node_hooks
from strace_lens.metrics import kl_divergence
from strace_lens.progress import GRADIENT_ROW_COST, rows_ran
from strace_lens.search.bands import start_bands
from strace_lens.search.measured import MeasuredRows
from strace_lens.search.resumed import (
    blocks_return_tuples,
    can_resume,
    capture_hooks,
    resumed_logprobs,
)
from strace_lens.skipped_mlps import mlp_kept_rows, mlps_on_kept_rows

#: receives, after each chunk of ``kl``: the chunk's row indices, their KL and log-probs,
#: and the layers hooked for them (see :mod:`strace_lens.search.measured`)
LogpSink = Callable[[Tensor, Tensor, Tensor, Tensor], None]


@dataclass
class SubgraphObjective:
    """Scores node masks on prompts against the full model. Use inside ``model_untouched``.

    A mask's units are the graph's nodes, in layer order; a subclass may choose other units
    (``TokenObjective``: every node at every position) by overriding ``n_nodes``,
    ``units_per_layer`` and ``hooks``: every search method sees only those.
    """

    #: what a mask's units are ("node": heads and MLPs); the node-only baselines check it
    granularity: ClassVar[str] = "node"

    model: Any
    graph: NodeGraph
    batch: TokenBatch
    logp_full: Float[Tensor, "prompt vocab"]
    ablation: Ablation
    candidates: Bool[Tensor, " node"]
    batch_size: int | None = None
    #: counts forward rows run, for cost reporting
    rows_evaluated: int = 0
    #: counts (row, block) pairs run: a row resumed at layer L counts n_layers - L
    layer_rows: int = 0
    #: counts the model's forward calls (one per chunk of rows)
    forward_calls: int = 0
    #: whether the model's blocks return tuples (probed on the first resumed run)
    _block_tuples: bool | None = None
    #: False once the model refused ``start_at_layer`` (TransformerLens 3.x's bridge raises
    #: NotImplementedError): rows then run whole forwards, which give the same log-probs
    _resumes: bool = True
    #: rows a search has run and kept for the evaluation to read back (``measured.reused``
    #: counts those read)
    measured: MeasuredRows = field(init=False)
    #: rows per pass once chosen (``rows_per_pass``), lowered after an out-of-memory error
    _rows_chosen: int | None = None

    def __post_init__(self) -> None:
        self.measured = MeasuredRows(self.units_per_layer)

    @property
    def n_prompts(self) -> int:
        return self.batch.batch_size

    @property
    def n_nodes(self) -> int:
        return len(self.graph)

    @property
    def units_per_layer(self) -> int:
        """Mask units per layer (units are in layer order: unit // this = its layer)."""
        return self.graph.nodes_per_layer

    def hooks(
        self, masks: Tensor, rows: TokenBatch, hooked: Tensor | None = None
    ) -> list[tuple[str, Any]]:
        """The forward hooks that apply ``masks`` ``[row, unit]`` to the batch ``rows``
        (``hooked``: layers to hook even where every row keeps every unit; see node_hooks)."""
        return node_hooks(self.graph, masks, self.ablation, rows, hooked)

    def mlp_kept_rows(self, masks: Tensor) -> dict[int, Tensor]:
        """For each layer whose MLP some row ablates, the rows that keep it: the others skip
        computing it (:mod:`strace_lens.skipped_mlps`); a subclass whose units are not whole
        nodes returns {} (nothing skipped)."""
        return mlp_kept_rows(self.graph, masks)

    def hooked_layers(self, masks: Tensor) -> Tensor:
        """The layers :meth:`hooks` hooks for ``masks`` (bool ``[layer]``)."""
        return hooked_layers(self.graph, masks)

    @property
    def rows_per_pass(self) -> int:
        """``batch_size``, or (None) a figure chosen from the device's free memory
        (:mod:`strace_lens.memory`); halved for the rest of the run after a pass ran out of
        memory."""
        if self._rows_chosen is None:
            if self.batch_size is not None:
                self._rows_chosen = max(1, int(self.batch_size))
            else:
                device = model_device(self.model)
                width = int(self.batch.tokens.shape[1])
                self._rows_chosen = memory.rows_per_pass(
                    self.model, width, device, memory.free_bytes(device)
                )
        return self._rows_chosen

    def _in_chunks(self, n_rows: int, run: Callable[[int, int], None]) -> None:
        """``run(lo, hi)`` over consecutive chunks of ``rows_per_pass`` rows; a chunk that runs
        out of memory is run again with half as many rows per pass (down to one row)."""
        lo = 0
        while lo < n_rows:
            hi = min(lo + self.rows_per_pass, n_rows)
            try:
                run(lo, hi)
            except (RuntimeError, MemoryError) as err:
                if hi - lo <= 1 or not memory.is_out_of_memory(err):
                    raise
                memory.release_cached_memory(self.logp_full.device)
                self._rows_chosen = max(1, (hi - lo) // 2)
                continue
            lo = hi

    def full_mask(self, candidate_values: Tensor) -> Tensor:
        """Embed ``[..., n_candidates]`` values into ``[..., node]`` (non-candidates kept = 1)."""
        shape = (*candidate_values.shape[:-1], self.n_nodes)
        out = torch.ones(shape, dtype=candidate_values.dtype, device=candidate_values.device)
        idx = torch.nonzero(self.candidates).flatten().to(candidate_values.device)
        return out.index_copy(-1, idx, candidate_values)

    def _run(
        self,
        masks: Tensor,
        prompt_index: Tensor,
        capture: Tensor | None = None,
        start_layer: int = 0,
        cache: Tensor | None = None,
        hooked: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Log-probs of the rows, and the layers hooked for them (``node_hooks``; a layer a
        resumed row skipped counts as hooked: the cache comes from a gradient pass)."""
        rows = self.batch.select(prompt_index).trimmed()
        hooks = self.hooks(masks, rows, hooked)
        ran_hooked = self.hooked_layers(masks)
        if hooked is not None:
            ran_hooked = ran_hooked | hooked.cpu()
        if capture is not None:
            hooks += capture_hooks(capture, prompt_index)
        kept = self.mlp_kept_rows(masks)
        skipped = mlps_on_kept_rows(self.model, kept, len(prompt_index), masks.requires_grad)
        with skipped:
            logp, start_layer = self._forward(rows, hooks, start_layer, cache, prompt_index)
        self.rows_evaluated += len(prompt_index)
        self.forward_calls += 1
        rows_ran(len(prompt_index))
        self.layer_rows += len(prompt_index) * (self.graph.n_layers - start_layer)
        ran_hooked[:start_layer] = True
        return logp, ran_hooked

    def _forward(
        self,
        rows: TokenBatch,
        hooks: list[tuple[str, Any]],
        start_layer: int,
        cache: Tensor | None,
        prompt_index: Tensor,
    ) -> tuple[Tensor, int]:
        """Log-probs of ``rows`` with ``hooks``, from the cached residual at ``start_layer``
        where the model allows it; also the layer it started at (0 after a whole forward)."""
        logp = None
        if start_layer > 0 and cache is not None and self._resumes:
            width = rows.tokens.shape[1]
            resid = cache[prompt_index, start_layer, :width].to(self.logp_full.device)
            try:
                if self._block_tuples is None:
                    self._block_tuples = blocks_return_tuples(self.model, self.batch)
                logp = resumed_logprobs(
                    self.model, rows, hooks, start_layer, resid, self._block_tuples
                )
            except NotImplementedError:
                self._resumes = False
        if logp is None:
            start_layer = 0
            logp = forward_logprobs(self.model, rows, hooks)
        return logp, start_layer

    def can_resume(self) -> bool:
        """Whether rows can be run from a cached residual stream (``residual_store``)."""
        return self._resumes and can_resume(self.model, self.batch)

    def residual_store(self) -> Float[Tensor, "prompt layer pos d_model"]:
        """An empty store for the residual entering every block, one base row per prompt
        (filled by ``kl_backward(..., capture=store)``, read by ``kl(..., cache=store)``)."""
        n_p, width = self.batch.tokens.shape
        d_model = int(self.model.cfg.d_model)
        # the model's own dtype: a bf16/fp16 model's residual is stored and resumed exactly
        dtype = next(self.model.parameters()).dtype
        return torch.zeros(
            n_p, self.graph.n_layers, width, d_model, device=self.logp_full.device, dtype=dtype
        )

    @torch.no_grad()
    def logprobs(
        self,
        masks: Float[Tensor, "row node"],
        prompt_index: Int[Tensor, " row"],
        hooked: Bool[Tensor, " layer"] | None = None,
    ) -> Float[Tensor, "row vocab"]:
        """Log-probs of every (prompt, mask) row, no gradient; ``hooked``: layers hooked
        besides those the rows need (``node_hooks``)."""
        out = []

        def run(lo: int, hi: int) -> None:
            out.append(self._run(masks[lo:hi].float(), prompt_index[lo:hi], hooked=hooked)[0])

        self._in_chunks(len(prompt_index), run)
        return torch.cat(out)

    @torch.no_grad()
    def kl(
        self,
        masks: Float[Tensor, "row node"],
        prompt_index: Int[Tensor, " row"],
        start_layer: Int[Tensor, " row"] | None = None,
        cache: Float[Tensor, "prompt layer pos d_model"] | None = None,
        sink: LogpSink | None = None,
    ) -> Float[Tensor, " row"]:
        """KL(P_full || P_sub) of each row, no gradient (one vocab-sized row at a time).

        With ``start_layer`` and ``cache``: row r runs from the cached residual entering block
        ``start_layer[r]`` of its prompt, which must be the residual of a mask that agrees
        with row r on every node below that layer, or from a lower layer of the same cache
        (rows are run in start-layer bands, :mod:`strace_lens.search.bands`).
        ``sink`` sees every chunk's row indices, KL, log-probs and hooked layers.
        """
        if start_layer is None or cache is None:
            start_layer = torch.zeros(len(prompt_index), dtype=torch.long)
        own_start = start_layer.cpu()
        band = start_bands(own_start, self.graph.n_layers, self.rows_per_pass)
        # the full model's dtype: a float64 model's KL stays float64
        out = torch.empty(len(prompt_index), device=self.logp_full.device,
                          dtype=self.logp_full.dtype)  # fmt: skip
        for layer in torch.unique(band).tolist():
            idx = torch.nonzero(band == layer).flatten()

            def run(lo: int, hi: int, idx: Tensor = idx, layer: int = layer) -> None:
                rows = idx[lo:hi].to(prompt_index.device)
                logp, hooked = self._run(
                    masks[rows].float(),
                    prompt_index[rows],
                    None,
                    layer,
                    cache,
                    _recomputed_layers(layer, own_start[idx[lo:hi]], self.graph.n_layers),
                )
                kl = kl_divergence(self.logp_full[prompt_index[rows]], logp)
                out[rows.to(out.device)] = kl
                if sink is not None:
                    sink(rows, kl, logp, hooked)

            self._in_chunks(len(idx), run)
        return out

    def kl_backward(
        self,
        masks: Float[Tensor, "row node"],
        prompt_index: Int[Tensor, " row"],
        weights: Float[Tensor, " row"],
        capture: Float[Tensor, "prompt layer pos d_model"] | None = None,
    ) -> Float[Tensor, " row"]:
        """KL of each row, and ``sum(weights * KL)`` back-propagated into ``masks``' graph.

        ``masks`` must be a non-leaf tensor computed from the parameters being learned; each
        chunk is differentiated on its own (so memory stays bounded by ``rows_per_pass``).
        With ``capture`` (from ``residual_store``, one row per prompt), the residual entering
        every block is stored there for later ``kl(..., cache=capture)`` calls.
        """
        out = []

        def run(lo: int, hi: int) -> None:
            with torch.enable_grad():
                logp, _ = self._run(masks[lo:hi], prompt_index[lo:hi], capture)
                kl = kl_divergence(self.logp_full[prompt_index[lo:hi]], logp)
                # an out-of-memory error inside this backward pass comes before the gradient
                # reaches the learned parameters (their leaf is the graph's last node), so
                # the chunk can be run again; the earlier chunks' gradients stay accumulated
                (kl * weights[lo:hi]).sum().backward(retain_graph=hi < len(prompt_index))
            rows_ran((GRADIENT_ROW_COST - 1) * (hi - lo))  # the backward pass, for progress
            out.append(kl.detach())

        self._in_chunks(len(prompt_index), run)
        return torch.cat(out)


def _recomputed_layers(
    band_start: int, own_start: Int[Tensor, " row"], n_layers: int
) -> Bool[Tensor, " layer"] | None:
    """The layers to hook in a band's chunk besides those its masks need: those some row
    recomputes below its own start layer, hooked as in the gradient pass that filled the
    cache (which hooks every layer: a hook that keeps a node may change its last bit under a
    mean ablation); None where every row starts at the band's start."""
    top = int(own_start.max()) if len(own_start) else band_start
    if top <= band_start:
        return None
    layers = torch.zeros(n_layers, dtype=torch.bool)
    layers[band_start:top] = True
    return layers
