"""The GPU report script (benchmarks/gpu_report.py) without a GPU: a device is lent rarely
and briefly, so what can be checked here (its verdicts, its parsing of pytest's junit XML
and of the benchmark rows, its step runner's time limit, its exit without a GPU) is."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_report  # noqa: E402 - a script beside the benchmarks, not a package


def row(group, case, n, fmt, ratios, simulator=False, skipped=None):
    return {"group": group, "case": case, "n": n, "format": fmt, "bytes": 28 * (n or 1), "simulator": simulator,
            "impls": {"fastopt": {"median_s": 1e-4, "gb_s": 900.0}}, "ratios": ratios,
            "skipped": skipped or {}, "notes": []}


def spread(median, lo, hi):
    return {"median": median, "min": lo, "max": hi}


# (the rows, the verdict of the first goal (fp32 Adam at 1e8 against the copy roof), the reason's words)
VERDICTS = [
    ([row("rule", "adam", 10**8, "float32", {"roof": spread(0.91, 0.88, 0.93)})], "met", "median 0.91"),
    ([row("rule", "adam", 10**8, "float32", {"roof": spread(0.80, 0.78, 0.90)})], "missed", "vs 0.85"),
    ([row("rule", "adam", 10**8, "float32", {"roof": spread(2.0, 2.0, 2.0)}, simulator=True)], "not measured",
     "simulator"),
    ([row("rule", "adam", 10**7, "float32", {"roof": spread(0.95, 0.9, 1.0)})], "not measured", "no benchmark row"),
    ([row("rule", "adam", 10**8, "bfloat16", {"roof": spread(0.95, 0.9, 1.0)})], "not measured", "no benchmark row"),
    ([row("rule", "adam", 10**8, "float32", {}, skipped={"roof": "out of memory"})], "not measured",
     "out of memory"),
]


@pytest.mark.parametrize("rows, verdict, why", VERDICTS)
def test_goal_verdicts(rows, verdict, why):
    goals = gpu_report.verdicts(rows)
    assert len(goals) == len(gpu_report.GOALS)
    assert goals[0]["verdict"] == verdict
    assert why in goals[0]["why"]
    assert all(g["verdict"] == "not measured" for g in goals[1:])  # no row for the other goals


def test_markdown_names_every_goal_and_row():
    rows = [row("rule", "adam", 10**8, "float32", {"roof": spread(0.91, 0.88, 0.93),
                                                   "torch_fused": spread(1.2, 1.1, 1.3)}),
            row("model", "model-tiny", 1208, "float32", {"torch_fused": spread(0.7, 0.6, 0.8)})]
    report = {"started": "2026-01-01 00:00:00", "seconds": 12.0, "environment": {"gpu": "H200"},
              "steps": [{"name": "benchmarks", "status": "timeout", "seconds": 170.0, "reason": "limit"}],
              "goals": gpu_report.verdicts(rows), "benchmarks": rows}
    text = gpu_report.markdown(report)
    for goal in gpu_report.GOALS:
        assert goal[0] in text
    assert "| rule adam | 1e+08 | float32 | 100.0 | 900 | 91% [88-93] | 1.20 [1.10-1.30] |" in text
    assert "| tiny-model step: no slower than torch fused |" in text and "| missed" in text
    assert "| benchmarks | timeout | 170.0 | limit |" in text


def test_junit_summary_counts_and_names_failures(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite tests="4" failures="1" errors="1" skipped="1">'
                   '<testcase classname="tests.test_a" name="ok"/>'
                   '<testcase classname="tests.test_a" name="bad"><failure message="assert 1 == 2">x</failure>'
                   '</testcase><testcase classname="tests.test_b" name="boom"><error message="OSError: no">y</error>'
                   '</testcase><testcase classname="tests.test_b" name="skip"><skipped/></testcase>'
                   '</testsuite></testsuites>')
    summary = gpu_report.junit_summary(xml)
    assert (summary["tests"], summary["passed"], summary["failures"], summary["errors"], summary["skipped"]) == \
        (4, 1, 1, 1, 1)
    assert [f["test"] for f in summary["failed"]] == ["tests.test_a::bad", "tests.test_b::boom"]
    assert summary["failed"][0]["why"] == "assert 1 == 2"
    assert gpu_report.junit_summary(tmp_path / "absent.xml") is None


@pytest.mark.parametrize("warm, hit", [
    ({"cache_hits": 3, "cache_misses": 0}, True),
    ({"cache_hits": 2, "cache_misses": 1}, False),
    ({"cache_hits": 0, "cache_misses": 3}, False),
])
def test_cache_verdict(warm, hit):
    cold = {"cache_hits": 0, "cache_misses": 3, "first_step_s": 2.0, "second_step_s": 1e-4}
    warm = {**warm, "first_step_s": 0.3, "second_step_s": 1e-4}
    verdict = gpu_report.cache_verdict(cold, warm)
    assert verdict["hit"] is hit
    assert ("did NOT hit" in verdict["summary"]) is not hit
    assert gpu_report.cache_verdict(None, warm)["hit"] is None
    # the guarded optimizer step's kernels (norm pass, prologue, device update) judged apart
    cold_g = {**cold, "guarded_first_step_s": 3.0, "guarded_cache_hits": 0, "guarded_cache_misses": 3}
    warm_g = {**warm, "guarded_first_step_s": 0.01, "guarded_cache_hits": 3 if hit else 1,
              "guarded_cache_misses": 0 if hit else 2}
    verdict = gpu_report.cache_verdict(cold_g, warm_g)
    assert verdict["guarded_hit"] is hit and "A guarded fastopt.Adam step" in verdict["summary"]
    assert "The guarded step failed: boom" in gpu_report.cache_verdict(cold, {**warm, "guarded_error": "boom"})[
        "summary"]


def test_a_step_past_its_limit_is_stopped_and_recorded(tmp_path):
    code = "import time; print('started', flush=True); time.sleep(60)"
    rec = gpu_report.run_step("sleeper", [sys.executable, "-c", code], 2, tmp_path)
    assert rec["status"] == "timeout" and rec["seconds"] < 20
    assert "started" in (tmp_path / rec["log"]).read_text()
    rec = gpu_report.run_step("fails", [sys.executable, "-c", "raise SystemExit('broken on purpose')"], 30, tmp_path)
    assert rec["status"] == "failed" and "broken on purpose" in rec["reason"]


def test_the_last_json_line_of_a_step():
    step = {"tail": ["compiling", json.dumps({"first_step_s": 1.5}), "done", "[1, 2]"]}
    assert gpu_report._json_line(step) == {"first_step_s": 1.5}
    assert gpu_report._json_line({"tail": ["no json here"]}) is None


def test_without_a_gpu_the_command_says_why_and_exits_0(tmp_path, monkeypatch):
    monkeypatch.delenv("NUMBA_ENABLE_CUDASIM", raising=False)  # gpu_missing drops it from os.environ
    if gpu_report.gpu_missing() is None:
        pytest.skip("this machine has a GPU: the report would run for minutes")
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_report.sh"), str(tmp_path / "report")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "skipped, no GPU" in out.stdout
    assert len(out.stdout.strip().splitlines()) == 1, out.stdout  # the reason on one line
    assert not (tmp_path / "report").exists()  # nothing written


def test_the_torch_twin_s_lines_are_kept():
    tail = ["digits: 1438 training ...", "fastopt.torch.AdamW  test accuracy  97.2%  (9,000 examples/s)",
            "torch.optim.AdamW    test accuracy  97.0%  (8,000 examples/s)", "largest weight difference 1e-2"]
    summary = gpu_report.torch_train_summary({"tail": tail, "reason": None})["summary"]
    assert summary.splitlines() == tail[1:]
    assert "not measured: exit status 1" in gpu_report.torch_train_summary({"tail": [], "reason": "exit status 1"})[
        "summary"]
