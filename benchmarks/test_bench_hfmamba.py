"""The hfmamba suite on a tiny model: HF's MambaForCausalLM and its rnnkern twin agree, the
records are well-formed, a disagreement is recorded instead of timed.

    pytest benchmarks/test_bench_hfmamba.py

Plain tests (no benchmark fixture); skipped where transformers is not installed.
"""
import pytest
import torch

from benchmarks.suites import hfmamba
from benchmarks.timing import Settings

needs_transformers = pytest.mark.skipif(hfmamba.unavailable() is not None, reason=str(hfmamba.unavailable()))
SETTINGS = Settings(torch.device("cpu"), quick=True, warmup=1, repeats=3)
PROMPT, NEW = 5, 6


def tiny():
    return hfmamba.hf_config(d_model=32, layers=2)


@needs_transformers
def test_tiny_case_matches_and_records_are_well_formed():
    records = hfmamba.run_case(tiny(), PROMPT, NEW, SETTINGS)
    assert [r["backend"] for r in records] == list(hfmamba.BACKENDS)
    for record in records:
        assert "skipped" not in record, record["skipped"]
        assert record["shape"] == [1, PROMPT, NEW] and record["new_tokens"] == NEW
        assert len(record["generated_ids"]) == NEW
        assert record["prompt_logits_max_abs_diff"] <= hfmamba.LOGITS_ATOL
        assert record["ms_per_token"] == pytest.approx(record["ms_median"] / (NEW - 1))
        assert all(cell(record) for _, cell in hfmamba.COLUMNS)
    assert records[0]["speedup_vs_hf"] == 1.0
    ours = records[-1]
    assert ours["weight_bytes_per_token"] > 0 and ours["weight_gbps"] > 0


@needs_transformers
def test_a_disagreement_is_reported_with_its_first_position():
    hf_model = hfmamba.build_hf(tiny())
    ours = hfmamba.RnnkernMambaLM(hf_model)
    prompt = torch.arange(PROMPT)[None]
    with torch.no_grad():
        expected = ours.generate(prompt, NEW)
        wrong = expected.clone()
        wrong[0, 3] = (wrong[0, 3] + 1) % hf_model.config.vocab_size
        calls = {"transformers": lambda: hfmamba.hf_loop(hf_model, prompt, NEW), "rnnkern": lambda: wrong}
        mismatch, _ = hfmamba.check(hf_model, ours, prompt, calls)
        assert mismatch == "rnnkern's greedy ids differ from transformers' first at new token 3"
        ours.mixers[0].out_proj.weight.add_(0.1)
        mismatch, checks = hfmamba.check(hf_model, ours, prompt, calls)
    assert mismatch.startswith("prompt logits differ by") and checks["prompt_logits_max_abs_diff"] > 1e-4


def test_without_transformers_the_suite_records_a_skip(monkeypatch):
    monkeypatch.setattr(hfmamba, "unavailable", lambda: "transformers is not installed")
    records = hfmamba.run(SETTINGS)
    assert [r["skipped"] for r in records] == ["transformers is not installed"] * len(hfmamba.BACKENDS)
