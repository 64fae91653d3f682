"""The GPU report (issue 15, item 6): one command that proves or disproves fastopt's GPU half
on a machine with a GPU, in under 8 minutes, and writes ``report.json`` and ``report.md``
under OUTDIR.

    bash benchmarks/gpu_report.sh OUTDIR      # or: python benchmarks/gpu_report.py OUTDIR

Steps, each in its own process with its own time limit (a failure or a timeout is recorded
with its reason and the next step runs): the environment (GPU, driver, CUDA, packages); the
first step in a fresh process with an empty kernel cache and again with the cache it left
(did the CUDA disk cache hit?); the GPU benchmarks (``benchmarks/test_gpu.py``, whose rows
carry the goals' verdicts); ``fastopt train --device cuda --epochs 3``; the CuPy nn path;
every ``cuda``-marked test on the real GPU. Without a GPU it prints one line saying why and
exits 0. It installs nothing but fastopt itself (``pip install -e . --no-deps``) and
ml-dtypes, and only when they do not import.
"""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 450  # every step together; the whole command stays under 8 minutes

# the goals of issue 15: (name, row (group, case, n, format), ratio, at least, what the ratio is)
GOALS = [
    ("fp32 Adam at 1e8: >= 85% of the copy roof", ("rule", "adam", 10**8, "float32"), "roof", 0.85,
     "copy time / fastopt time"),
    ("fp32 Adam at 1e8: >= 1.0x torch fused", ("rule", "adam", 10**8, "float32"), "torch_fused", 1.0,
     "torch fused time / fastopt time"),
    ("195-tensor model: >= 1.5x torch fused", ("model", "model-200", None, "float32"), "torch_fused", 1.5,
     "torch fused time / fastopt time"),
    ("tiny-model step: no slower than torch fused", ("model", "model-tiny", None, "float32"), "torch_fused", 1.0,
     "torch fused time / fastopt time"),
    ("tiny-model step replayed from a CUDA graph: >= 3x faster than torch fused",
     ("graph", "model-tiny", None, "float32"), "torch_fused", 3.0, "torch fused (plain) time / fastopt replay time"),
]


def log(msg):
    print(f"[gpu_report] {msg}", flush=True)


# -- the GPU, and what to install --------------------------------------------------------------

def gpu_missing():
    """None when Numba sees a CUDA GPU, else the one-line reason."""
    os.environ.pop("NUMBA_ENABLE_CUDASIM", None)  # the real GPU, never the simulator
    try:
        from numba import cuda
    except ImportError as e:
        return f"numba is not installed ({e})"
    try:
        if cuda.is_available():
            return None
        cuda.detect()  # prints Numba's reason when it has one
    except Exception as e:  # the driver's messages span lines: the reason stays one
        return " ".join(f"numba.cuda found no usable GPU ({type(e).__name__}: {e})".split())
    return "numba.cuda.is_available() is False (no CUDA driver or GPU)"


def _imports(module):
    out = subprocess.run([sys.executable, "-c", f"import {module}; print({module}.__file__)"], cwd="/",
                         capture_output=True, text=True, timeout=120)
    return out.stdout.strip() if out.returncode == 0 else None


def ensure_installed():
    """fastopt from this checkout, and ml-dtypes: installed only when they do not import."""
    notes = []
    if _imports("ml_dtypes") is None:
        notes.append(_pip(["ml-dtypes"]))
    where = _imports("fastopt.kernels")
    if where is None or not Path(where).resolve().is_relative_to(ROOT):
        notes.append(_pip(["--no-deps", "--no-build-isolation", "-e", str(ROOT)]))
    return notes


def _pip(args):
    log(f"pip install {' '.join(args)}")
    out = subprocess.run([sys.executable, "-m", "pip", "install", "-q", *args], capture_output=True, text=True,
                         timeout=180)
    status = "ok" if out.returncode == 0 else f"failed: {out.stderr.strip().splitlines()[-1:]}"
    return f"pip install {' '.join(args)}: {status}"


# -- steps -------------------------------------------------------------------------------------

def run_step(name, cmd, timeout, outdir, env=None):
    """Run ``cmd`` in its own process group, its output streamed with a prefix and saved to
    ``logs/<name>.log``; killed at ``timeout`` seconds. Returns the step's record."""
    logs = outdir / "logs"
    logs.mkdir(exist_ok=True)
    path = logs / f"{name}.log"
    log(f"{name}: running {' '.join(map(str, cmd))} (time limit {timeout:.0f} s)")
    t0 = time.perf_counter()
    tail = []
    with open(path, "w") as f:
        proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)

        def pump():
            for line in proc.stdout:
                f.write(line)
                tail.append(line.rstrip())
                del tail[:-40]
                print(f"  {name} | {line.rstrip()}", flush=True)
        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
            status = "ok" if rc == 0 else "failed"
            reason = None if rc == 0 else f"exit status {rc}: {_last_error(tail)}"
        except subprocess.TimeoutExpired:
            # SIGINT first: pytest then still writes what it has (the junit XML of the tests so far)
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            status, reason = "timeout", f"interrupted at the step's {timeout:.0f} s limit"
        reader.join(timeout=5)
    seconds = time.perf_counter() - t0
    log(f"{name}: {status} in {seconds:.1f} s" + (f" ({reason})" if reason else ""))
    return {"name": name, "status": status, "reason": reason, "seconds": round(seconds, 1),
            "log": str(path.relative_to(outdir)), "tail": tail[-12:]}


def _last_error(lines):
    for line in reversed(lines):
        if line.strip() and not line.startswith(" "):
            return line.strip()[:300]
    return "no output"


def _child_env(cache_dir):
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env.update(PYTHONUNBUFFERED="1", NUMBA_CACHE_DIR=str(cache_dir))
    return env


def first_step():
    """(run in a fresh process) The first fused Adam step's latency: compile, or load from the
    CUDA disk cache, then launch; and what the cache says it did."""
    t0 = time.perf_counter()
    import numpy as np
    from numba import cuda

    from fastopt.functional import adam_
    from fastopt.kernels import RULES
    imported = time.perf_counter() - t0
    n = 1 << 20
    arrays = [cuda.to_device(np.random.default_rng(k).standard_normal(n).astype(np.float32)) for k in range(2)]
    arrays += [cuda.to_device(np.zeros(n, np.float32)) for _ in range(2)]
    cuda.synchronize()
    t0 = time.perf_counter()
    adam_(*arrays, step=1, lr=1e-3)
    cuda.synchronize()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    adam_(*arrays, step=2, lr=1e-3)
    cuda.synchronize()
    second = time.perf_counter() - t0
    stats = RULES["adam"][0].kernels.cuda().stats
    out = {"import_s": imported, "first_step_s": first, "second_step_s": second,
           "cache_hits": sum(stats.cache_hits.values()), "cache_misses": sum(stats.cache_misses.values()),
           "cache_path": str(stats.cache_path)}
    try:  # a guarded optimizer step (decided on the device): the norm pass, the prologue, the device update
        import fastopt
        from fastopt.kernels import _device, _reduce
        rule = RULES["adam"][0]
        opt = fastopt.Adam([arrays[0]], lr=1e-3)  # nonfinite="skip": decided on the device
        t0 = time.perf_counter()
        opt.step([arrays[1]])
        cuda.synchronize()
        out["guarded_first_step_s"] = time.perf_counter() - t0
        for kernel in (_reduce.NORM[_reduce.SQUARES].layers_cuda(np.float32), _device.prologue(rule),
                       _device.update(rule)):
            out["guarded_cache_hits"] = out.get("guarded_cache_hits", 0) + sum(kernel.stats.cache_hits.values())
            out["guarded_cache_misses"] = out.get("guarded_cache_misses", 0) + sum(kernel.stats.cache_misses.values())
    except Exception as e:  # reported, and the plain step's figures still count
        out["guarded_error"] = f"{type(e).__name__}: {e}"
    print(json.dumps(out))


def environment():
    """(run in a fresh process) GPU, driver and CUDA versions, package versions, as JSON."""
    import importlib.metadata as md

    from numba import cuda
    info = {"python": sys.version.split()[0]}
    dev = cuda.get_current_device()
    info["gpu"] = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
    info["compute_capability"] = ".".join(map(str, dev.compute_capability))
    info["multiprocessors"] = dev.MULTIPROCESSOR_COUNT
    try:
        from numba.cuda.cudadrv import driver, runtime
        info["cuda_driver_api"] = ".".join(map(str, driver.driver.get_version()))
        info["cuda_runtime_numba"] = ".".join(map(str, runtime.runtime.get_version()))
    except Exception as e:
        info["cuda_versions_error"] = repr(e)
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        info["nvidia_smi"] = out.stdout.strip() or out.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        info["nvidia_smi"] = f"not run: {e}"
    packages = {}
    for name in ("numpy", "numba", "numba-cuda", "cupy-cuda13x", "cupy-cuda12x", "cupy", "torch", "ml-dtypes",
                 "pytest", "pytest-benchmark", "cuda-python", "cuda-bindings", "cuda-core", "fastopt"):
        with contextlib.suppress(md.PackageNotFoundError):
            packages[name] = md.version(name)
    info["packages"] = packages
    try:
        import torch
        info["torch_cuda"] = torch.version.cuda
    except ImportError:
        pass
    try:
        import cupy
        info["cupy_cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
        info["cupy_cuda_driver"] = cupy.cuda.runtime.driverGetVersion()
    except Exception as e:
        info["cupy"] = f"unavailable: {e}"
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    info["fastopt_commit"] = rev.stdout.strip()
    print(json.dumps(info))


def _json_line(step):
    """The last line of a step's output that parses as a JSON object, or None."""
    for line in reversed(step["tail"]):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def junit_summary(path):
    """Counts and the failed tests (name, first line of the message) of a junit XML file."""
    if not path.exists():
        return None
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in root.iter("testcase"):
        for bad in list(case.findall("failure")) + list(case.findall("error")):
            message = (bad.get("message") or bad.text or "").strip().splitlines()
            failed.append({"test": f"{case.get('classname')}::{case.get('name')}", "why": (message or [""])[0][:300]})
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "failed": failed}


# -- verdicts --------------------------------------------------------------------------------

def find_row(rows, group, case, n, fmt):
    for row in rows:
        if (row["group"], row["case"], row["format"]) == (group, case, fmt) and (n is None or row["n"] == n):
            return row
    return None


def verdicts(rows):
    """The goals of issue 15 against the benchmark rows: each goal's median ratio, its spread
    over the rounds (min-max), the target, and met / missed / not measured (with why)."""
    out = []
    for name, key, peer, target, meaning in GOALS:
        row = find_row(rows, *key)
        entry = {"goal": name, "target": target, "ratio": meaning, "median": None, "min": None, "max": None}
        if row is None:
            entry.update(verdict="not measured", why="no benchmark row (the step failed, timed out or skipped it)")
        elif row.get("simulator"):
            entry.update(verdict="not measured", why="measured on the CUDA simulator: times mean nothing")
        elif peer not in row["ratios"]:
            why = row["skipped"].get(peer.split("_")[0]) or f"no {peer} column in the row"
            entry.update(verdict="not measured", why=why)
        else:
            r = row["ratios"][peer]
            entry.update(median=r["median"], min=r["min"], max=r["max"],
                         verdict="met" if r["median"] >= target else "missed",
                         why=f"median {r['median']:.2f} (rounds {r['min']:.2f}-{r['max']:.2f}) vs {target}")
        out.append(entry)
    return out


# -- the report ------------------------------------------------------------------------------

def _fmt_ratio(r, scale=1, unit="", digits=2):
    if r is None:
        return "-"
    return f"{scale * r['median']:.{digits}f}{unit} [{scale * r['min']:.{digits}f}-{scale * r['max']:.{digits}f}]"


def markdown(report):
    env, lines = report.get("environment") or {}, []
    lines += ["# fastopt GPU report", "",
              f"{report['started']} UTC, {report['seconds']:.0f} s in all. GPU: {env.get('gpu', '?')} "
              f"(cc {env.get('compute_capability', '?')}, {env.get('multiprocessors', '?')} SMs); "
              f"nvidia-smi: {env.get('nvidia_smi', '?')}; CUDA driver API {env.get('cuda_driver_api', '?')}, "
              f"runtime {env.get('cuda_runtime_numba', '?')}; torch CUDA {env.get('torch_cuda', '-')}; "
              f"fastopt {env.get('fastopt_commit', '?')}.", "",
              "Packages: " + ", ".join(f"{k} {v}" for k, v in (env.get("packages") or {}).items()), ""]
    if report.get("install"):
        lines += ["Installed: " + "; ".join(report["install"]), ""]
    lines += ["## Steps", "", "| step | status | seconds | why |", "|---|---|---|---|"]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']} | {s['reason'] or ''} |" for s in report["steps"]]
    lines += ["", "## Goals (issue 15)", "", "| goal | ratio | median [min-max over rounds] | target | verdict |",
              "|---|---|---|---|---|"]
    for g in report["goals"]:
        measured = "-" if g["median"] is None else f"{g['median']:.2f} [{g['min']:.2f}-{g['max']:.2f}]"
        lines.append(f"| {g['goal']} | {g['ratio']} | {measured} | {g['target']} | {g['verdict']}"
                     f"{'' if g['median'] is not None else ': ' + g['why']} |")
    cache = report.get("cache")
    if cache:
        lines += ["", "## CUDA kernel disk cache", "", cache["summary"]]
    tests = report.get("cuda_tests")
    if tests:
        lines += ["", "## cuda-marked tests on the GPU", "",
                  f"{tests['passed']} passed, {tests['failures']} failed, {tests['errors']} errors, "
                  f"{tests['skipped']} skipped of {tests['tests']}."]
        lines += [f"- FAILED {f['test']}: {f['why']}" for f in tests["failed"][:30]]
    train = report.get("train")
    if train:
        lines += ["", "## fastopt train --device cuda --epochs 3", "", train["summary"]]
    torch_train = report.get("torch_train")
    if torch_train:
        lines += ["", "## The same conv net in torch CUDA (examples/torch_digits.py --device cuda --net train-conv "
                  "--epochs 3)", "", "```", torch_train["summary"], "```"]
    rows = report.get("benchmarks") or []
    if rows:
        lines += ["", "## Benchmarks", "",
                  "Times: CUDA events, the implementations alternating round by round; x peer = peer time / "
                  "fastopt time (above 1: fastopt is faster), median [min-max] of the per-round ratios; "
                  "% roof = copy time / fastopt time.", "",
                  "| row | n | format | fastopt us | GB/s | % roof | x torch | x cupy | notes |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in rows:
            fast = row["impls"].get("fastopt", {})
            torch_key = next((k for k in row["ratios"] if k.startswith("torch_fused") and k != "torch_fused_graph"),
                             next((k for k in row["ratios"] if k.startswith("torch")), None))
            roof = row["ratios"].get("roof")
            notes = list(row["notes"]) + [f"{k} skipped: {v}" for k, v in row["skipped"].items()]
            if torch_key and torch_key != "torch_fused":
                notes.append(f"x torch is {torch_key}")
            if "torch_fused_graph" in row["ratios"]:
                notes.append(f"x torch graph {_fmt_ratio(row['ratios']['torch_fused_graph'])}")
            lines.append(
                f"| {row['group']} {row['case']} | {row['n']:.0e} | {row['format']} | "
                f"{fast.get('median_s', 0) * 1e6:.1f} | {fast.get('gb_s') or 0:.0f} | "
                f"{_fmt_ratio(roof, 100, '%', 0)} | {_fmt_ratio(row['ratios'].get(torch_key))} | "
                f"{_fmt_ratio(row['ratios'].get('cupy'))} | "
                f"{'; '.join(notes)} |")
    return "\n".join(lines) + "\n"


def main(argv):
    if argv[:1] == ["--first-step"]:
        return first_step()
    if argv[:1] == ["--environment"]:
        return environment()
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python benchmarks/gpu_report.py OUTDIR", file=sys.stderr)
        return 2
    why = gpu_missing()
    if why is not None:
        print(f"gpu_report: skipped, no GPU: {why}")
        return 0
    t_start, started = time.perf_counter(), time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    outdir = Path(argv[0]).resolve()
    outdir.mkdir(parents=True, exist_ok=True)
    report = {"started": started, "steps": [], "install": ensure_installed()}
    cache_dir = outdir / "numba_cache"  # the steps share one kernel cache (the cold run has its own)
    env = _child_env(cache_dir)
    py = sys.executable

    def remaining(reserve):
        return BUDGET_S - (time.perf_counter() - t_start) - reserve

    def step(name, cmd, limit, reserve, step_env=env):
        timeout = min(limit, remaining(reserve))
        if timeout < 5:
            rec = {"name": name, "status": "skipped", "reason": "no time left in the 8-minute budget",
                   "seconds": 0, "log": None, "tail": []}
            log(f"{name}: skipped (no time left)")
        else:
            rec = run_step(name, cmd, timeout, outdir, step_env)
        report["steps"].append(rec)
        return rec

    # each reserve: the least time the steps after it need
    rec = step("environment", [py, __file__, "--environment"], 40, 400)
    report["environment"] = _json_line(rec) if rec["status"] == "ok" else None

    cold_dir = outdir / "numba_cache_cold"
    shutil.rmtree(cold_dir, ignore_errors=True)
    cold = step("first-step-cold", [py, __file__, "--first-step"], 60, 360, _child_env(cold_dir))
    warm = step("first-step-warm", [py, __file__, "--first-step"], 40, 340, _child_env(cold_dir))
    report["cache"] = cache_verdict(_json_line(cold), _json_line(warm))

    bench_json = outdir / "benchmarks.json"
    bench_env = {**env, "FASTOPT_GPU_BENCH_JSON": str(bench_json)}
    step("benchmarks", [py, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "benchmarks/test_gpu.py"],
         170, 200, bench_env)
    report["benchmarks"] = json.loads(bench_json.read_text()) if bench_json.exists() else []

    train_out = outdir / "train"
    step("train", [py, "-m", "fastopt", "train", "--device", "cuda", "--epochs", "3", "--out", train_out], 60, 160)
    report["train"] = train_summary(train_out / "metrics.json")

    step("torch-digits-cuda", [py, "examples/torch_digits.py", "--device", "cuda", "--net", "train-conv",
                               "--epochs", "3"], 60, 100)
    report["torch_train"] = torch_train_summary(report["steps"][-1])

    step("nn-cupy", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_nn.py",
                     "tests/test_preprocessing.py", "tests/test_data.py", "-k", "cuda or cupy"], 45, 60)

    junit = outdir / "cuda_tests.xml"
    step("cuda-tests", [py, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "-p", "no:randomly",
                        f"--junitxml={junit}", "tests/"], 400, 0)
    report["cuda_tests"] = junit_summary(junit)

    report["goals"] = verdicts(report["benchmarks"])
    report["seconds"] = time.perf_counter() - t_start
    (outdir / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (outdir / "report.md").write_text(markdown(report))
    log(f"wrote {outdir / 'report.json'} and {outdir / 'report.md'} in {report['seconds']:.0f} s")
    for g in report["goals"]:
        log(f"goal: {g['goal']}: {g['verdict']} ({g['why']})")
    failed = [s["name"] for s in report["steps"] if s["status"] != "ok"]
    log("every step ran to the end" if not failed else f"steps not ok: {', '.join(failed)}")
    return 0


def cache_verdict(cold, warm):
    """Whether the CUDA disk cache hit in the second fresh process, and what it saved."""
    if cold is None or warm is None:
        return {"hit": None, "summary": "not measured: a first-step run failed (see its log)", "cold": cold,
                "warm": warm}
    hit = warm["cache_hits"] > 0 and warm["cache_misses"] == 0
    summary = (f"First Adam step (1M float32) in a fresh process: {cold['first_step_s'] * 1e3:.0f} ms with an "
               f"empty cache ({cold['cache_misses']} compiled), {warm['first_step_s'] * 1e3:.0f} ms in the next "
               f"process ({warm['cache_hits']} loaded from disk, {warm['cache_misses']} compiled): the cache "
               f"{'hit' if hit else 'did NOT hit'}. Second step: {warm['second_step_s'] * 1e3:.2f} ms.")
    guarded = None
    if "guarded_first_step_s" in cold and "guarded_first_step_s" in warm:
        guarded = warm.get("guarded_cache_hits", 0) > 0 and warm.get("guarded_cache_misses", 1) == 0
        summary += (f" A guarded fastopt.Adam step after it (norm, prologue, update): "
                    f"{cold['guarded_first_step_s'] * 1e3:.0f} ms cold, {warm['guarded_first_step_s'] * 1e3:.0f} ms "
                    f"warm ({warm.get('guarded_cache_hits', 0)} loaded, {warm.get('guarded_cache_misses', 0)} "
                    f"compiled): {'hit' if guarded else 'did NOT hit'}.")
    elif "guarded_error" in cold or "guarded_error" in warm:
        summary += f" The guarded step failed: {warm.get('guarded_error') or cold.get('guarded_error')}."
    return {"hit": hit, "guarded_hit": guarded, "summary": summary, "cold": cold, "warm": warm}


def train_summary(path):
    if not path.exists():
        return {"summary": "not measured: the run wrote no metrics.json (see its log)"}
    s = json.loads(path.read_text()).get("summary", {})
    return {**s, "summary": f"{s.get('examples_per_s', 0):,.0f} train examples/s, test accuracy "
                            f"{s.get('final_test_acc', 0):.2%} after {s.get('epochs')} epochs, "
                            f"{s.get('seconds', 0):.1f} s."}


def torch_train_summary(step):
    """The lines of examples/torch_digits.py (the torch twin of the conv net, on CUDA, stepped by
    fastopt.torch.AdamW and by torch.optim.AdamW) that carry the figures."""
    kept = [line for line in step["tail"] if line.startswith(("fastopt.torch", "torch.optim", "largest"))]
    return {"summary": "\n".join(kept) if kept else f"not measured: {step['reason'] or 'no output'}"}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
