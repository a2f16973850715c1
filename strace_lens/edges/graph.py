"""The paper's token-level graph of one prompt: residual-stream states and the edges into them.

Nodes are residual-stream states ``(graph layer, position)``: graph layer 0 is the input
embedding, ``1 + 2l`` the state after block l's attention (``resid_mid``) and ``2 + 2l`` the
state after its MLP (``resid_post``). The output node is the last graph layer at the last
position. Edges (names are stable and readable; ``l`` block, ``h`` query head, ``j`` source
position, ``t`` target position):

- ``a{l}.h{h}:{j}->{t}``: head h of block l moving position j into position t (j <= t); its
  vector is ``A[h, t, j] * v_j W_O^h``; source node ``(2l, j)``, target ``(1 + 2l, t)``.
- ``r{l}.attn:{t}``: the skip path around block l's attention at t, ``(2l, t) -> (1 + 2l, t)``.
- ``m{l}:{t}``: block l's MLP at t, ``(1 + 2l, t) -> (2 + 2l, t)``.
- ``r{l}.mlp:{t}``: the skip path around block l's MLP at t, same source and target.

Nodes that cannot reach the output are pruned with their in-edges: only the last block's
nodes at positions before the last one are unreachable (every earlier state reaches the last
block's attention through some head), so the last block keeps only the last position's edges.

Two index spaces. The *dense* layout is the concatenation of the three mask tensors the
masked forward takes, flattened: attention ``[layer, head, q, k]``, residual
``[layer, 2, pos]`` (0 = into the attention node, 1 = into the MLP node) and MLP
``[layer, pos]``. It also holds slots that are not edges (``k > q``, pruned nodes). The
*compact* edge id is an edge's rank among the dense slots that are edges, in dense order:
ids run over ``[0, n_edges)`` and are what rankings and results store.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

EdgeKind = Literal["attn", "resid_attn", "mlp", "resid_mlp"]

_NAME = re.compile(
    r"^(?:a(?P<al>\d+)\.h(?P<h>\d+):(?P<j>\d+)->(?P<at>\d+)"
    r"|r(?P<rl>\d+)\.(?P<rk>attn|mlp):(?P<rt>\d+)"
    r"|m(?P<ml>\d+):(?P<mt>\d+))$"
)


@dataclass(frozen=True)
class Edge:
    """One edge of the graph, decoded."""

    name: str
    kind: EdgeKind
    layer: int
    target_pos: int
    source_pos: int
    head: int | None  # None except for attention edges


@dataclass(frozen=True)
class EdgeGraph:
    """The pruned edge graph of an ``n_pos``-token prompt in an ``n_layers`` x ``n_heads`` model."""

    n_layers: int
    n_heads: int
    n_pos: int

    def __post_init__(self) -> None:
        if self.n_layers < 1 or self.n_heads < 1 or self.n_pos < 1:
            raise ValueError(
                "An edge graph needs at least one layer, one head and one token; got "
                f"n_layers={self.n_layers}, n_heads={self.n_heads}, n_pos={self.n_pos}."
            )

    @classmethod
    def from_model(cls, model: Any, n_pos: int) -> EdgeGraph:
        cfg = model.cfg
        return cls(n_layers=int(cfg.n_layers), n_heads=int(cfg.n_heads), n_pos=int(n_pos))

    # -- sizes of the dense layout -----------------------------------------------------------
    @property
    def attn_shape(self) -> tuple[int, int, int, int]:
        return (self.n_layers, self.n_heads, self.n_pos, self.n_pos)

    @property
    def resid_shape(self) -> tuple[int, int, int]:
        return (self.n_layers, 2, self.n_pos)

    @property
    def mlp_shape(self) -> tuple[int, int]:
        return (self.n_layers, self.n_pos)

    @property
    def n_attn_slots(self) -> int:
        return self.n_layers * self.n_heads * self.n_pos * self.n_pos

    @property
    def n_resid_slots(self) -> int:
        return self.n_layers * 2 * self.n_pos

    @property
    def n_dense(self) -> int:
        return self.n_attn_slots + self.n_resid_slots + self.n_layers * self.n_pos

    # -- which dense slots are edges ---------------------------------------------------------
    @cached_property
    def valid_parts(
        self,
    ) -> tuple[
        Bool[Tensor, "layer head q k"], Bool[Tensor, "layer two pos"], Bool[Tensor, "layer pos"]
    ]:
        """The dense slots that are edges of the pruned graph, as (attention, residual, MLP)."""
        t = self.n_pos
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        attn = causal.expand(self.n_layers, self.n_heads, t, t).clone()
        resid = torch.ones(self.resid_shape, dtype=torch.bool)
        mlp = torch.ones(self.mlp_shape, dtype=torch.bool)
        # the last block's nodes before the last position cannot reach the output
        attn[-1, :, : t - 1] = False
        resid[-1, :, : t - 1] = False
        mlp[-1, : t - 1] = False
        return attn, resid, mlp

    @cached_property
    def valid(self) -> Bool[Tensor, " dense"]:
        return torch.cat([part.flatten() for part in self.valid_parts])

    @cached_property
    def dense_ids(self) -> Int[Tensor, " edge"]:
        """The dense slot of each compact edge id."""
        return torch.nonzero(self.valid).flatten()

    @property
    def n_edges(self) -> int:
        """E: the number of edges after pruning (closed form, checked against the mask)."""
        full = self.n_heads * self.n_pos * (self.n_pos + 1) // 2 + 3 * self.n_pos
        last = self.n_heads * self.n_pos + 3
        return (self.n_layers - 1) * full + last

    def __len__(self) -> int:
        return self.n_edges

    # -- kinds, sources, targets -------------------------------------------------------------
    @cached_property
    def _dense_fields(self) -> dict[str, Tensor]:
        """Per dense slot: kind code (0 attn, 1 resid_attn, 2 mlp, 3 resid_mlp) and indices."""
        n_l, n_h, t = self.n_layers, self.n_heads, self.n_pos
        li, hi, qi, ki = torch.meshgrid(
            torch.arange(n_l), torch.arange(n_h), torch.arange(t), torch.arange(t), indexing="ij"
        )
        rl, rk, rt = torch.meshgrid(
            torch.arange(n_l), torch.arange(2), torch.arange(t), indexing="ij"
        )
        ml, mt = torch.meshgrid(torch.arange(n_l), torch.arange(t), indexing="ij")
        kind = torch.cat(
            [
                torch.zeros(self.n_attn_slots, dtype=torch.long),
                (1 + 2 * rk).flatten(),  # 0 -> resid_attn (1), 1 -> resid_mlp (3)
                torch.full((n_l * t,), 2, dtype=torch.long),
            ]
        )
        layer = torch.cat([li.flatten(), rl.flatten(), ml.flatten()])
        head = torch.cat([hi.flatten(), torch.full((self.n_dense - self.n_attn_slots,), -1)])
        target = torch.cat([qi.flatten(), rt.flatten(), mt.flatten()])
        source = torch.cat([ki.flatten(), rt.flatten(), mt.flatten()])
        return {"kind": kind, "layer": layer, "head": head, "target": target, "source": source}

    @cached_property
    def edge_fields(self) -> dict[str, Tensor]:
        """Per compact edge: ``kind`` (0 attn, 1 resid_attn, 2 mlp, 3 resid_mlp), ``layer``,
        ``head`` (-1 if none), ``target``/``source`` positions and graph nodes."""
        fields = {k: v[self.dense_ids] for k, v in self._dense_fields.items()}
        into_mlp = fields["kind"] >= 2
        # graph layer of the target: 1 + 2l (attention node) or 2 + 2l (MLP node); sources
        # sit one graph layer below; node id = graph_layer * n_pos + position
        target_layer = 1 + 2 * fields["layer"] + into_mlp.long()
        fields["target_node"] = target_layer * self.n_pos + fields["target"]
        fields["source_node"] = (target_layer - 1) * self.n_pos + fields["source"]
        return fields

    @property
    def n_nodes(self) -> int:
        """Graph layers x positions (pruned nodes included; they have no edges)."""
        return (2 * self.n_layers + 1) * self.n_pos

    def node_name(self, node: int) -> str:
        """``emb@{t}`` (graph layer 0), ``attn{l}@{t}`` (after block l's attention, graph layer
        1 + 2l) or ``mlp{l}@{t}`` (after its MLP, graph layer 2 + 2l)."""
        if not 0 <= node < self.n_nodes:
            raise IndexError(f"Node {node} is outside [0, {self.n_nodes}).")
        g, t = divmod(node, self.n_pos)
        if g == 0:
            return f"emb@{t}"
        return f"{'attn' if g % 2 else 'mlp'}{(g - 1) // 2}@{t}"

    @property
    def output_node(self) -> int:
        return 2 * self.n_layers * self.n_pos + self.n_pos - 1

    @cached_property
    def in_edges(self) -> tuple[Int[Tensor, " node_plus_1"], Int[Tensor, " edge"]]:
        """CSR of the edges entering each node: edges ``ids[ptr[n]:ptr[n + 1]]`` enter node n
        (in increasing compact id)."""
        target = self.edge_fields["target_node"]
        ids = torch.sort(target, stable=True).indices
        counts = torch.bincount(target, minlength=self.n_nodes)
        ptr = torch.zeros(self.n_nodes + 1, dtype=torch.long)
        ptr[1:] = counts.cumsum(0)
        return ptr, ids

    # -- names -------------------------------------------------------------------------------
    def edge(self, edge_id: int) -> Edge:
        if not 0 <= edge_id < self.n_edges:
            raise IndexError(f"Edge id {edge_id} is outside [0, {self.n_edges}).")
        f = {k: int(v[edge_id]) for k, v in self.edge_fields.items()}
        kind: EdgeKind = ("attn", "resid_attn", "mlp", "resid_mlp")[f["kind"]]
        layer, t, j = f["layer"], f["target"], f["source"]
        if kind == "attn":
            name = f"a{layer}.h{f['head']}:{j}->{t}"
        elif kind == "mlp":
            name = f"m{layer}:{t}"
        else:
            name = f"r{layer}.{'attn' if kind == 'resid_attn' else 'mlp'}:{t}"
        return Edge(name, kind, layer, t, j, f["head"] if kind == "attn" else None)

    def name(self, edge_id: int) -> str:
        return self.edge(edge_id).name  # same spelling as names(), checked by the tests

    def names(self, edge_ids: Tensor | list[int] | None = None) -> list[str]:
        """Names of the given compact ids (all edges by default), read in one pass."""
        if edge_ids is None:
            ids = torch.arange(self.n_edges)
        else:
            ids = torch.as_tensor(edge_ids, dtype=torch.long)
            if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= self.n_edges):
                raise IndexError(f"Edge ids must lie in [0, {self.n_edges}).")
        f = {k: v[ids].tolist() for k, v in self.edge_fields.items()}
        out = []
        for kind, layer, head, t, j in zip(
            f["kind"], f["layer"], f["head"], f["target"], f["source"]
        ):
            if kind == 0:
                out.append(f"a{layer}.h{head}:{j}->{t}")
            elif kind == 2:
                out.append(f"m{layer}:{t}")
            else:
                out.append(f"r{layer}.{'attn' if kind == 1 else 'mlp'}:{t}")
        return out

    def index(self, name: str) -> int:
        """The compact id of an edge given by name (``"a3.h1:0->7"``, ``"r2.mlp:5"``, ...)."""
        match = _NAME.match(name)
        if match is None:
            raise KeyError(
                f"{name!r} is not an edge name: 'a{{l}}.h{{h}}:{{j}}->{{t}}', 'r{{l}}.attn:{{t}}', "
                "'r{l}.mlp:{t}' or 'm{l}:{t}'."
            )
        g = match.groupdict()
        t_, h_ = self.n_pos, self.n_heads
        if g["al"] is not None:
            layer, head, j, t = int(g["al"]), int(g["h"]), int(g["j"]), int(g["at"])
            ok = layer < self.n_layers and head < h_ and j <= t < t_
            dense = ((layer * h_ + head) * t_ + t) * t_ + j
        elif g["rl"] is not None:
            layer, t = int(g["rl"]), int(g["rt"])
            ok = layer < self.n_layers and t < t_
            dense = self.n_attn_slots + (layer * 2 + (g["rk"] == "mlp")) * t_ + t
        else:
            layer, t = int(g["ml"]), int(g["mt"])
            ok = layer < self.n_layers and t < t_
            dense = self.n_attn_slots + self.n_resid_slots + layer * t_ + t
        if not ok or not bool(self.valid[dense]):
            raise KeyError(
                f"{name!r} is not an edge of this graph ({self.n_layers} layers, {h_} heads, "
                f"{t_} tokens; the last block keeps only edges into position {t_ - 1})."
            )
        return int(self.valid[:dense].sum())

    # -- masks -------------------------------------------------------------------------------
    def dense_mask(
        self, keep: Bool[Tensor, "*rows edge"] | Float[Tensor, "*rows edge"], fill: float = 1.0
    ) -> Float[Tensor, "*rows dense"]:
        """Scatter per-edge mask values into the dense layout; non-edge slots get ``fill``
        (they cannot change the output, whatever their value)."""
        keep = keep if keep.dtype.is_floating_point else keep.float()
        out = torch.full((*keep.shape[:-1], self.n_dense), fill, dtype=keep.dtype)
        out = out.to(keep.device)
        return out.index_copy(-1, self.dense_ids.to(keep.device), keep)

    def keep_mask(self, edge_ids: Tensor | list[int]) -> Bool[Tensor, " edge"]:
        mask = torch.zeros(self.n_edges, dtype=torch.bool)
        mask[torch.as_tensor(edge_ids, dtype=torch.long)] = True
        return mask

    def to_dict(self) -> dict[str, int]:
        return {"n_layers": self.n_layers, "n_heads": self.n_heads, "n_pos": self.n_pos}
