"""The figures and HTML page of token-granularity results (strace_lens/plot/token_fidelity.py,
token_units.py, html_report.token_report_html): the numbers drawn against hand computations
from the result, on real token traces of the tiny model."""

from __future__ import annotations

import pytest

import strace_lens.plot as sp
from strace_lens import trace
from strace_lens.tiny_model import tiny_model

#: byte-tokenised (BOS + one token a byte): 12, 9 and 8 tokens, three lengths
PROMPTS = ["The cat sat", "Paris is", "one two"]
SIZES = [0.02, 0.1, 0.5]


@pytest.fixture(scope="module")
def model():
    return tiny_model(device="cpu")


@pytest.fixture(scope="module")
def learned(model):
    """A nested family (learned masks), with its inverses."""
    return trace(model, PROMPTS, granularity="token", sizes=SIZES, steps=3, finetune_steps=2)


@pytest.fixture(scope="module")
def drawn_at_random(model):
    """Independent random subgraphs (not nested), no inverses."""
    return trace(
        model, PROMPTS, granularity="token", method="random", sizes=SIZES, draws=1, inverse=False
    )


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def line(fig, name: str, axis: str = "y"):
    """The line called ``name`` on the top panel (``y``) or the bottom one (``y2``)."""
    (found,) = [t for t in fig.data if t.name == name and t.yaxis == axis and t.fill is None]
    return found


def test_token_fidelity_draws_median_tv_inverse_and_top1_computed_by_hand(model, learned):
    fig = sp.token_fidelity(learned)
    units = [model.cfg.n_layers * (model.cfg.n_heads + 1) * (len(p) + 1) for p in PROMPTS]
    counts = learned.counts.tolist()
    tv, inv, top1 = (learned.metrics[k].tolist() for k in ("tv", "inv_tv", "top1"))
    for j in range(len(SIZES)):
        x = sum(counts[p][j] / units[p] for p in range(3)) / 3
        median_tv = line(fig, "mask subgraph")
        assert median_tv.x[j] == pytest.approx(x, rel=1e-12)
        assert median_tv.y[j] == pytest.approx(median([tv[p][j] for p in range(3)]), abs=1e-7)
        inverse = line(fig, "inverse (the subgraph ablated)")
        assert inverse.y[j] == pytest.approx(median([inv[p][j] for p in range(3)]), abs=1e-7)
        kept = line(fig, "mask subgraph", "y2")
        assert kept.y[j] == pytest.approx(100 * sum(top1[p][j] for p in range(3)) / 3)
    # relative sizes asked for are met up to rounding in each prompt
    assert line(fig, "mask subgraph").x == pytest.approx(SIZES, rel=0.35)
    assert fig.layout.template.layout.font.family.startswith("Arial")  # the project template


def test_token_fidelity_without_inverses_draws_no_inverse_line(drawn_at_random):
    fig = sp.token_fidelity(drawn_at_random)
    assert [t.name for t in fig.data if t.showlegend is not False] == ["random subgraph"]


@pytest.mark.parametrize("which", ["learned", "drawn_at_random"])
def test_token_units_colours_each_unit_by_the_first_subgraph_that_holds_it(request, which):
    result = request.getfixturevalue(which)
    for prompt in range(len(PROMPTS)):
        fig = sp.token_units(result, prompt)
        (heat,) = fig.data
        names = result.graph(prompt).node_graph.names
        n_pos = len(PROMPTS[prompt]) + 1
        assert list(heat.y) == names and len(heat.x) == n_pos
        held = [set(result.subgraph(prompt, j).tolist()) for j in range(len(SIZES))]
        expected = [
            [
                next((j for j in range(len(SIZES)) if node * n_pos + pos in held[j]), None)
                for pos in range(n_pos)
            ]
            for node in range(len(names))
        ]
        assert [list(row) for row in heat.z] == expected
        # every unit of the largest subgraph is coloured, and no other
        coloured = sum(v is not None for row in expected for v in row)
        assert coloured == len(set().union(*held))
    if which == "learned":  # nested: the largest subgraph holds every coloured unit
        assert coloured == int(result.counts[len(PROMPTS) - 1, -1])


def test_token_units_labels_tokens_and_refuses_a_wrong_prompt(model, learned):
    fig = sp.token_units(learned, 2, model=model)
    tokens = ["<bos>", *"one", "␣", *"two"]  # decoded byte tokens, the space made visible
    assert list(fig.data[0].x) == [f"{t}: {c}" for t, c in enumerate(tokens)]
    with pytest.raises(IndexError, match=r"prompt must lie in \[0, 3\)"):
        sp.token_units(learned, 3)
    with pytest.raises(ValueError, match="traced over 8 tokens but 2 token strings"):
        sp.token_units(learned, 2, tokens=["a", "b"])


def test_token_report_page_holds_both_figures(learned, tmp_path):
    page = sp.token_report_html(learned, tmp_path / "sub" / "report.html", notes="a & b")
    text = page.read_text(encoding="utf-8")
    assert 'id="fig-token_fidelity"' in text and 'id="fig-token_units"' in text
    assert "a &amp; b" in text  # the notes, escaped
    # 3 blocks x (4 heads + 1 MLP) x 8 to 12 positions
    assert "<td>120–180</td>" in text and "<td>0.02, 0.1, 0.5</td>" in text
