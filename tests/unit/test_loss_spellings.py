"""Every row of the "Accepted spellings" table in docs/losses.md, through config validation and the recipe's
`build_objective`: the table is what the code does."""

import re
from pathlib import Path

import pytest

from internvl_tune.config import ConfigError, MPOConfig, load_config
from internvl_tune.recipes.mpo import build_objective

TABLE = Path(__file__).resolve().parents[2] / "docs" / "losses.md"
FIELDS = ("loss_type", "loss_weights", "sigmoid_loss_weight", "bco_pair_loss_weight", "rpo_alpha")


def _rows() -> list[tuple[list[str], str]]:
    """(overrides, objective cell) per table row; an empty cell is a field left unset."""
    text = TABLE.read_text()
    table = text[text.index("<!-- loss-spellings: begin -->") : text.index("<!-- loss-spellings: end -->")]
    lines = [line for line in table.splitlines() if line.startswith("|")][2:]  # after the header and |---|
    rows = []
    for line in lines:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == len(FIELDS) + 1, line
        overrides = [f"mpo.{name}={cell.strip('`')}" for name, cell in zip(FIELDS, cells, strict=False) if cell]
        rows.append((overrides, cells[-1]))
    return rows


ROWS = _rows()


def test_the_table_has_every_kind_of_row():
    kinds = [cell.split(":")[0].split(",")[0] for _, cell in ROWS]
    assert len(ROWS) >= 10 and any(k == "refused" for k in kinds) and any("warning" in c for _, c in ROWS)


@pytest.mark.parametrize("overrides, objective", ROWS, ids=[" ".join(o) or "defaults" for o, _ in ROWS])
def test_loss_spelling(overrides, objective):
    expected = re.search(r"`([^`]*)`", objective).group(1)
    overrides = ["model.model_name_or_path=m", "data.meta_path=meta.json", *overrides]
    if objective.startswith("refused"):
        with pytest.raises(ConfigError, match=re.escape(expected)):
            load_config(MPOConfig, None, overrides)
        return
    config = load_config(MPOConfig, None, overrides)
    if "warning" in objective:
        with pytest.warns(UserWarning, match="ignored"):
            built = build_objective(config)
    else:
        built = build_objective(config)
    terms = [term.split() for term in expected.split(" + ")]
    assert built.loss_types == [name for name, _ in terms]
    assert built.loss_weights == [float(weight) for _, weight in terms]


def test_a_refused_spelling_is_one_error_line_from_the_cli(tmp_path, capsys):
    from internvl_tune.cli import main

    config = tmp_path / "mpo.yaml"
    config.write_text("model: {model_name_or_path: m}\ndata: {meta_path: meta.json}\n")
    assert main(["mpo", "--config", str(config), "loss_type=[sigmoid, sft]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: mpo.loss_type: ['sigmoid', 'sft'] lists 'sft' but loss_weights is unset; give one weight per type "
        "in loss_weights, or drop 'sft' and give its weight as rpo_alpha (the original spelling)"
    ]
