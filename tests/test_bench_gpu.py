"""The `gpu` bench section and bench/gpu_probe.py, on the parts a machine without a GPU can run:
the section's skip (one line, recorded, the run passes), the network batch-size sweep and the
decode-per-core measurement on the CPU device with a tiny real export, and the probe script
end to end in a small configuration. The probe's GPU figures come from Keras on JAX; here it
runs on the TensorFlow backend (--backend tensorflow), and on JAX only where
GRAFT_PROBE_PYTHON names an interpreter with jax, keras, h5py and Pillow (no TensorFlow)."""

import ast
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.exports import TINY_IMAGE_SIZE, make_tiny_export
from support.images import encode, random_rgb

from bench import gpu as gpu_bench
from bench import report
from bench.__main__ import parse_args, plan, selected
from bench.config import QUICK, SECTIONS
from bench.sections import Context
from bench.servers import Model, Unavailable
from service.runtime.devices import DeviceUnavailable, visible_gpus
from service.store.layout import ONNX_FILE

REPO = Path(__file__).resolve().parent.parent
PROBE = REPO / "bench" / "gpu_probe.py"
PROBE_PYTHON = os.environ.get("GRAFT_PROBE_PYTHON")
HAS_GPU = visible_gpus() > 0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_export(tmp_path_factory.mktemp("model") / "export", labels=("a", "b"))


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    return [encode(random_rgb(64, 80, seed), "JPEG") for seed in range(6)]


def _meta() -> dict:
    return {"date": "2026-01-01 00:00 UTC", "commit": "abc", "command": "python -m bench"}


# -- the section where no GPU is visible ----------------------------------------------------------


def test_gpu_is_a_section_of_its_own():
    assert "gpu" in SECTIONS
    args = parse_args(["--only", "gpu"])
    assert selected(args) == ["gpu"]


def test_no_visible_gpu_is_unavailable_with_what_to_do_instead():
    with pytest.raises(Unavailable, match=r"no NVIDIA GPU visible.*bench/gpu_probe\.py"):
        gpu_bench.require_gpu(gpus=0)


@pytest.mark.skipif(HAS_GPU, reason="a GPU is visible here: the section runs instead")
def test_the_gpu_section_is_skipped_with_one_line_and_the_run_passes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
):
    import bench.__main__ as bench_main

    monkeypatch.setattr(bench_main, "RESULTS_DIR", tmp_path)
    ctx = Context(QUICK, True, Model("m", 1, tmp_path, "tiny", 8, 2), tmp_path, sys.executable)
    runner = bench_main.Runner(ctx, _meta())
    for _, step in plan(ctx, ["gpu"]):
        step(runner)
    assert (runner.failed, runner.skipped) == ([], ["gpu"])
    lines = [line for line in capsys.readouterr().out.splitlines() if "skipped" in line]
    assert len(lines) == 1 and "no NVIDIA GPU visible" in lines[0], lines
    saved = json.loads((tmp_path / "gpu.json").read_text())
    assert saved["ok"] is False and saved["skipped"].startswith("no NVIDIA GPU visible")
    row = report.runs_table({"gpu": saved})[2]
    assert "| skipped: no NVIDIA GPU visible" in row and "FAILED" not in row
    assert report.gpu_table({"gpu": saved}) == []


def test_a_gpu_without_onnx_runtime_s_cuda_provider_is_unavailable_too():
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    with pytest.raises(Unavailable, match=r"onnxruntime-gpu"):
        gpu_bench.require_gpu(gpus=1)


# -- the network alone, per batch size ------------------------------------------------------------


@pytest.fixture(scope="module")
def sweep(model_dir: Path) -> list[dict]:
    return gpu_bench.network_sweep(model_dir / ONNX_FILE, "cpu", [1, 4, 16], TINY_IMAGE_SIZE, 0.05)


def test_the_sweep_runs_the_onnx_network_at_every_batch_size(sweep: list[dict]):
    assert [row["batch_size"] for row in sweep] == [1, 4, 16]
    for row in sweep:
        assert (row["device"], row["runtime"]) == ("cpu", "onnxruntime")
        assert row["calls"] >= 3 and row["throughput_ips"] > 0
        assert 0 < row["latency_ms"]["p50"] <= row["latency_ms"]["p99"]
        # images/s is the batch over the mean call: the rows are consistent with each other
        mean_s = row["latency_ms"]["mean"] / 1000
        assert row["throughput_ips"] == pytest.approx(row["batch_size"] / mean_s, rel=1e-6)


@pytest.mark.skipif(HAS_GPU, reason="a GPU is visible here")
def test_the_sweep_on_a_gpu_that_is_not_there_refuses(model_dir: Path):
    with pytest.raises(DeviceUnavailable, match="no visible GPU"):
        gpu_bench.network_sweep(model_dir / ONNX_FILE, "gpu:0", [1], TINY_IMAGE_SIZE, 0.05)


def test_the_sweep_runs_as_its_own_process_from_a_spec(model_dir: Path, tmp_path: Path):
    spec = {
        "part": "sweep",
        "onnx": str(model_dir / ONNX_FILE),
        "device": "cpu",
        "batch_sizes": [2],
        "image_size": TINY_IMAGE_SIZE,
        "duration_s": 0.05,
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    assert gpu_bench.main([str(tmp_path / "spec.json"), str(tmp_path / "out.json")]) == 0
    (row,) = json.loads((tmp_path / "out.json").read_text())
    assert row["batch_size"] == 2 and row["throughput_ips"] > 0


# -- decode per core ------------------------------------------------------------------------------


def test_decode_runs_graft_s_preprocess_in_every_worker(model_dir: Path, jpegs: list[bytes]):
    result = gpu_bench.decode_per_core(model_dir, jpegs, workers=2, duration_s=0.3)
    assert result["workers"] == 2 and len(result["per_worker"]) == 2
    for worker in result["per_worker"]:
        # each worker decoded whole batches, and used some CPU doing it
        assert worker["images"] >= gpu_bench.DECODE_BATCH
        assert worker["images"] % gpu_bench.DECODE_BATCH == 0
        assert worker["cpu_s"] > 0 and worker["wall_s"] >= 0.3
    assert result["images"] == sum(w["images"] for w in result["per_worker"])
    assert result["images_per_cpu_s"] == pytest.approx(
        result["images"] / sum(w["cpu_s"] for w in result["per_worker"])
    )


def test_a_decode_worker_that_fails_fails_the_measurement_with_its_reason(
    tmp_path: Path, jpegs: list[bytes]
):
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(RuntimeError, match=r"a decode worker failed: .*SavedModel"):
        gpu_bench.decode_per_core(tmp_path / "not-a-model", jpegs, workers=1, duration_s=0.1)


def test_the_report_renders_measured_gpu_rows(sweep: list[dict]):
    decode = {"workers": 2, "images": 64, "throughput_ips": 80.0, "images_per_cpu_s": 41.0}
    run = {"concurrency": 16, "throughput_ips": 300.0, "mean_batch_size": 12.5,
           "latency_ms": {"p50": 40.0, "p99": 90.0}}  # fmt: skip
    data = {"ok": True, "device": "gpu:0", "sweep": sweep, "decode": [decode], "runs": [run]}
    lines = report.gpu_table({"gpu": data})
    assert lines[0] == "Device gpu:0."
    assert sum("network alone (onnxruntime)" in ln for ln in lines) == len(sweep)
    assert any("| 2 workers | 80.0 |" in ln and "41.0 img per CPU-second" in ln for ln in lines)
    assert any("mean batch 12.5 | 16 clients | 300.0 | 40.0 | 90.0 |" in ln for ln in lines)


# -- bench/gpu_probe.py ---------------------------------------------------------------------------


def test_the_probe_imports_only_what_the_gpu_machine_has():
    """Standard library, numpy, PIL, keras, jax; tensorflow only on the test backend's branch."""
    tree = ast.parse(PROBE.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported - set(sys.stdlib_module_names) == {"numpy", "PIL", "keras", "jax", "tensorflow"}


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ImageNet Lite0 weights file, made as the probe's docstring says."""
    from training.backbones import efficientnet_lite0

    path = tmp_path_factory.mktemp("weights") / "lite0.weights.h5"
    efficientnet_lite0(weights="imagenet").save_weights(path)
    return path


def _probe(python: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    return subprocess.run(
        [python, str(PROBE), *args],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO.parent,  # not the repository: nothing of graft is importable by accident
        env=env,
    )


SMALL = ["--batch-sizes", "1,3", "--image-size", "64", "--duration", "0.1"]
SMALL += ["--decode-workers", "1,2", "--decode-duration", "0.3", "--generated-images", "6"]


def _check_report(report_json: dict, weights: Path, precisions: list[str], modes: set[str]):
    assert report_json["graft_modules"] == [], "the probe must not import graft's packages"
    assert report_json["weights"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    rows = report_json["network"]["rows"]
    assert {(r["precision"], r["batch_size"], r["mode"]) for r in rows} == {
        (p, b, m) for p in precisions for b in (1, 3) for m in modes
    }
    assert all(r["calls"] >= 3 and r["throughput_ips"] > 0 for r in rows)
    decode = report_json["decode"]["rows"]
    assert [r["workers"] for r in decode] == [1, 2]
    assert all(r["images"] >= r["workers"] and r["images_per_cpu_s"] > 0 for r in decode)
    for precision in precisions:
        figures = report_json["derived"][precision]
        assert figures["knee_batch_size"] <= figures["best_batch_size"]
        assert figures["knee_throughput_ips"] >= gpu_probe_knee() * figures["best_throughput_ips"]
        assert figures["cores_to_feed_knee"] > 0


def gpu_probe_knee() -> float:
    import importlib.util

    spec = importlib.util.spec_from_file_location("probe_for_test", PROBE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.KNEE


def test_the_probe_measures_on_the_cpu_with_the_tensorflow_backend(weights: Path):
    done = _probe(sys.executable, "--weights", str(weights), "--backend", "tensorflow",
                  "--allow-cpu", "--precisions", "float32", *SMALL)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)  # stdout is the one JSON document, nothing else
    assert result["backend"] == "tensorflow" and result["platform"] == "cpu"
    _check_report(result, weights, ["float32"], {"host"})


@pytest.mark.skipif(HAS_GPU, reason="a GPU is visible here")
def test_the_probe_refuses_to_call_cpu_figures_gpu_ones(weights: Path):
    done = _probe(sys.executable, "--weights", str(weights), "--backend", "tensorflow",
                  *SMALL)  # fmt: skip
    assert done.returncode == 2 and done.stdout == ""
    assert "sees no GPU" in done.stderr and "--allow-cpu" in done.stderr


def test_the_probe_without_its_weights_file_says_so(tmp_path: Path):
    done = _probe(sys.executable, "--weights", str(tmp_path / "missing.weights.h5"))
    assert done.returncode == 2 and "missing.weights.h5 not found" in done.stderr


@pytest.mark.skipif(
    not PROBE_PYTHON,
    reason="set GRAFT_PROBE_PYTHON to a Python with jax, keras, h5py and Pillow (no TensorFlow) "
    "to run the probe as the GPU machine does",
)
def test_the_probe_on_jax_never_imports_tensorflow(weights: Path):
    done = _probe(str(PROBE_PYTHON), "--weights", str(weights), "--allow-cpu",
                  "--precisions", "float32,mixed_float16", *SMALL)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["backend"] == "jax" and result["tensorflow_imported"] is False
    _check_report(result, weights, ["float32", "mixed_float16"], {"host", "resident"})
