"""The demo's report: the printed table, summary ties, and loss_curves.png (the full run is in test_fit.py)."""
import copy
import dataclasses
import json
import sys

import pytest

import minillm_func as mf
from minillm_func import demo


def hand_built_summary():
    return {
        "stages": {
            "pretrain": {"before": 323.682, "after": 2.137},
            "sft": {"before": 0.0, "after": 0.835},
            "dpo": {"before": 0.0, "after": 0.96, "ties": {"before": 1.0, "after": 0.04},
                    "preferred_style_share": {"before": 0.095, "after": 0.99},
                    "exact_match_after_dpo": 0.735},
        },
        "samples": [{"prompt": "Q: double qbg\nA:", "after_sft": "qbgqbg, I think.", "after_dpo": "qbgqbg"}],
        "seconds": 218.4,
    }


def row(text: str, metric: str) -> list[str]:
    """The (before, after) cells of the table row whose metric is ``metric``."""
    (line,) = [ln for ln in text.splitlines() if metric in ln]
    return line.split()[-2:]


def test_format_summary_reports_ties_beside_preference_accuracy():
    summary = hand_built_summary()
    frozen = copy.deepcopy(summary)
    text = demo.format_summary(summary)
    assert row(text, "held-out preference accuracy") == ["0.000", "0.960"]
    assert row(text, "held-out pairs tied") == ["1.000", "0.040"]
    assert row(text, "held-out perplexity") == ["323.682", "2.137"]
    assert row(text, "greedy answers in preferred style") == ["0.095", "0.990"]
    assert row(text, "exact match (kept?)") == ["0.835", "0.735"]
    assert "counts a tied pair as wrong" in text
    assert "'qbgqbg'" in text and "total time 218 s" in text
    # pure: the same text again, the dict untouched
    assert demo.format_summary(summary) == text and summary == frozen


def write_fake_run(out, n=5, stages=("pretrain", "sft", "dpo")):
    for k, stage in enumerate(stages):
        (out / stage).mkdir(parents=True)
        records = [{"split": "train", "step": s, "loss": 3.0 - 0.1 * s + k, "reward": 0.1 * s}
                   for s in range(1, n + 1)]
        records.append({"split": "eval", "step": n, "loss": 99.0})  # not a training point
        (out / stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.mark.parametrize("loss_type,beta,dpo_title", [
    ("ipo", 0.1, "dpo: IPO loss (beta=0.1)"),
    ("sigmoid", 0.5, "dpo: DPO (sigmoid) loss (beta=0.5)"),
])
def test_plot_titles_each_panel_with_its_loss(tmp_path, monkeypatch, loss_type, beta, dpo_title):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    figures = []
    savefig = Figure.savefig

    def spy(fig, *args, **kwargs):  # record what is drawn, then save it for real
        figures.append(([ax.get_title() for ax in fig.axes], [list(ax.lines[0].get_ydata()) for ax in fig.axes]))
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    write_fake_run(tmp_path)
    config = dataclasses.replace(demo.DemoConfig(), dpo_loss_type=loss_type, beta=beta)
    said = []
    png = demo._plot(tmp_path, config, echo=said.append)
    assert png == tmp_path / "loss_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ((titles, curves),) = figures
    assert titles == ["pretrain: cross-entropy (next token)", "sft: cross-entropy on reply tokens", dpo_title]
    assert curves[2] == pytest.approx([5.0 - 0.1 * s for s in range(1, 6)])  # train records only
    assert said == [f"loss curves: {png}"]


def test_plot_without_matplotlib_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    write_fake_run(tmp_path)
    assert demo._plot(tmp_path, demo.DemoConfig()) is None
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and "skipped" in out[0] and "pip install 'minillm_func[plot]'" in out[0]
    assert not (tmp_path / "loss_curves.png").exists()


def test_before_dpo_every_held_out_pair_is_a_tie():
    """What the demo's "before" column measures: with the policy equal to the reference,
    every pair's rewards are equal, so accuracy 0 and ties 1 -- exactly."""
    tok = mf.ByteTokenizer()
    model = mf.build_model(mf.ModelConfig(vocab_size=tok.vocab_size, dim=16, n_layers=1, n_heads=2, max_seq_len=32))
    held = mf.PreferenceDataset(mf.demo_corpus(0, n_pretrain=1, n_dpo=8).dpo, tok, 32)
    trainer = mf.create_trainer("dpo", model, loss_type="ipo")
    state = trainer.init(model.init(0))
    m = trainer.evaluate(state, mf.Batches(held, 4, shuffle=False, epochs=1))
    assert m["rewards/ties"] == 1.0 and m["rewards/accuracies"] == 0.0
    # one update later the rewards differ: no pair is tied any more
    state, _ = trainer.step(state, next(iter(mf.Batches(held, 8, seed=0))))
    assert trainer.evaluate(state, mf.Batches(held, 4, shuffle=False, epochs=1))["rewards/ties"] == 0.0


def test_the_grpo_stage_reports_exact_match_and_sampled_reward_and_plots_the_reward(tmp_path, monkeypatch):
    summary = hand_built_summary()
    summary["stages"]["grpo"] = {"before": 0.835, "after": 0.9, "sampled_reward": {"first": 0.61, "last": 0.88,
                                                                                   "updates_averaged": 10}}
    summary["samples"][0]["after_grpo"] = "qbgqbg"
    text = demo.format_summary(summary)
    (exact,) = [ln for ln in text.splitlines() if ln.startswith("grpo") and "exact match" in ln]
    assert exact.split()[-2:] == ["0.835", "0.900"]
    assert row(text, "mean reward of sampled replies") == ["0.610", "0.880"]
    assert "after GRPO: 'qbgqbg'" in text
    assert "grpo" not in demo.format_summary(hand_built_summary())  # a summary from before GRPO still prints

    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    figures = []
    savefig = Figure.savefig

    def spy(fig, *args, **kwargs):
        figures.append(([ax.get_title() for ax in fig.axes], [list(ax.lines[0].get_ydata()) for ax in fig.axes],
                        [ax.get_ylabel() for ax in fig.axes]))
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    write_fake_run(tmp_path, stages=("pretrain", "sft", "dpo", "grpo"))
    demo._plot(tmp_path, demo.DemoConfig(), echo=lambda _: None)
    ((titles, curves, labels),) = figures
    assert titles[3] == "grpo: mean reward of 8 sampled replies" and labels[3] == "mean sampled reward"
    assert curves[3] == pytest.approx([0.1 * s for s in range(1, 6)])
