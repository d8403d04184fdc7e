"""bench/model_table.py: the JSON rows are the counter's numbers for the networks the table names."""
import json

import pytest

from bench import model_table
from src.models import count_params, create_model

pytestmark = pytest.mark.usefixtures("pynative_mode")


def test_model_table_rows_and_markdown(tmp_path):
    out, md = tmp_path / "t.json", tmp_path / "t.md"
    model_table.main(["--archs", "resnet18", "--heads", "gap", "--out", str(out), "--markdown", str(md)])
    rows = {r["setting"]: r for r in json.load(open(out))["rows"]}
    assert set(rows) == {"imagenet", "fine_grained"}
    assert rows["imagenet"]["params"] == 11_689_512  # torchvision's resnet18
    assert rows["fine_grained"]["params"] == count_params(create_model("resnet18", "gap", 200))
    assert rows["fine_grained"]["image_size"] == 448 and rows["fine_grained"]["classifier"] == "linear"
    # convolutions scale with the pixel count: 4x from 224 to 448 (the fc differs by 1000 vs 200 classes)
    conv224 = rows["imagenet"]["flops"]["conv_fc"] - 512 * 1000
    conv448 = rows["fine_grained"]["flops"]["conv_fc"] - 512 * 200
    assert conv448 == 4 * conv224
    assert "| resnet18 | gap | linear | 11.69 |" in md.read_text()
    with pytest.raises(SystemExit, match="unknown arch/head resnet9"):
        model_table.main(["--archs", "resnet9", "--out", str(out)])
