"""Each example script runs (at a small size) and prints its result."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script, args, expect", [
    ("train_loop.py", ["--steps", "20"], "done: 20 updates"),
    ("new_stage_orpo.py", ["--steps", "4"], "ORPO loss"),
    ("ensemble.py", ["--k", "2", "--steps", "10"], "member 0 vs trained alone"),
])
def test_example_runs(script, args, expect):
    r = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert expect in r.stdout
    lines = sum(1 for line in (ROOT / "examples" / script).read_text().splitlines() if line.strip())
    assert lines <= 60, f"{script} should stay a short read ({lines} lines)"


def test_hugging_face_examples_make_a_folder_then_fine_tune_and_export_it(tmp_path):
    transformers = pytest.importorskip("transformers")
    for script, args, expect in [("hf_tiny_model.py", [str(tmp_path / "tiny")], "chat template True"),
                                 ("hf_finetune.py", [str(tmp_path / "tiny"), str(tmp_path / "out"), "--steps", "3"],
                                  "exported")]:
        r = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0 and expect in r.stdout, r.stderr
        lines = sum(1 for line in (ROOT / "examples" / script).read_text().splitlines() if line.strip())
        assert lines <= 60, f"{script} should stay a short read ({lines} lines)"
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(model).__name__ == "LlamaForCausalLM"
