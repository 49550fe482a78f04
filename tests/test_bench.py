"""The benchmark harness on real parts: a tiny exported SavedModel, the tutorial peer served by
uvicorn on loopback, the load generator in its own process, the in-process ceiling, and the
report rendered from what those runs measured. Images are generated JPEGs, not ../shared."""

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from support.exports import make_tiny_export
from support.images import encode, random_rgb

from bench import report
from bench.__main__ import parse_args, plan, selected
from bench.ceiling import measure
from bench.ceiling import summarize as ceiling_summary
from bench.config import QUICK
from bench.images import image_paths, load_images
from bench.loadgen import poisson_offsets, run_spec
from bench.procs import ServerFailed, free_port, http_ok, serve
from bench.sections import Context, analyze_switch
from bench.servers import Model
from bench.stats import Sample, summarize
from bench.targets import V2_OUTPUTS, make_target, v2_binary_request
from bench.targets_check import verdicts
from bench.transport import RawTransport

REPO = Path(__file__).resolve().parent.parent
TRITON_PYTHON = REPO / "tests" / ".venv-tritonclient" / "bin" / "python"


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two class folders of generated 64x64 JPEGs, the layout of plantvillage-apple."""
    root = tmp_path_factory.mktemp("images")
    for c, name in enumerate(("healthy", "scab")):
        (root / name).mkdir()
        for i in range(4):
            (root / name / f"{i}.jpg").write_bytes(encode(random_rgb(64, 64, 10 * c + i), "JPEG"))
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_export(tmp_path_factory.mktemp("model") / "export", labels=("a", "b"))


@pytest.fixture(scope="module")
def tutorial_url(model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    port = free_port()
    cmd = [sys.executable, "-m", "uvicorn", "bench.peers.tutorial_app:app", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    with serve(
        "tutorial",
        cmd,
        env={"MODEL_DIR": str(model_dir)},
        ready=http_ok(f"{url}/healthz"),
        url=url,
        log_dir=tmp_path_factory.mktemp("logs"),
        cwd=REPO,
        timeout_s=120,
    ) as server:
        yield server.url


def closed(concurrency: int) -> dict:
    return {"mode": "closed", "concurrency": concurrency, "warmup_s": 0.3, "duration_s": 1.0}


# -- load generation against a real server -----------------------------------------------------


def test_closed_and_open_loop_against_the_tutorial_peer(tutorial_url: str, image_dir: Path):
    spec = {
        "target": {"kind": "tutorial", "url": tutorial_url, "model": "tiny"},
        "images": {"dir": str(image_dir), "count": 8},
        "runs": [
            closed(1),
            closed(4),
            {"mode": "open", "rate": 20.0, "warmup_s": 0.3, "duration_s": 1.0},
        ],
    }
    results = asyncio.run(run_spec(spec))
    for result in results:
        assert result["errors"] == 0, result["error_kinds"]
        assert result["requests"] > 0 and result["throughput_ips"] > 0
        assert 0 < result["latency_ms"]["p50"] <= result["latency_ms"]["p99"]
        assert result["loadgen_cpu_ms_per_request"] > 0
    assert results[2]["worst_dispatch_lag_ms"] >= 0


def test_httpx_and_raw_clients_get_the_same_answers(tutorial_url: str, image_dir: Path):
    spec = {
        "target": {"kind": "tutorial", "url": tutorial_url, "model": "tiny", "client": "httpx"},
        "images": {"dir": str(image_dir), "count": 4},
        "runs": [closed(2)],
    }
    [result] = asyncio.run(run_spec(spec))
    assert result["errors"] == 0 and result["requests"] > 0


def test_a_refused_connection_is_counted_as_an_error_not_a_crash(image_dir: Path):
    spec = {
        "target": {"kind": "tutorial", "url": f"http://127.0.0.1:{free_port()}", "model": "tiny"},
        "images": {"dir": str(image_dir), "count": 2},
        "runs": [closed(2)],
    }
    [result] = asyncio.run(run_spec(spec))
    assert result["errors"] == result["requests"] > 0
    assert set(result["error_kinds"]) == {"ConnectionRefusedError"}


def test_an_undecodable_image_is_an_http_error_of_the_peer(tutorial_url: str, tmp_path: Path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "0.jpg").write_bytes(b"not a jpeg at all")
    spec = {
        "target": {"kind": "tutorial", "url": tutorial_url, "model": "tiny"},
        "images": {"dir": str(tmp_path), "count": 1},
        "runs": [closed(1)],
    }
    [result] = asyncio.run(run_spec(spec))
    assert set(result["error_kinds"]) == {"http_400"}


# -- the raw HTTP client ------------------------------------------------------------------------


async def _read_request(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    await reader.readexactly(length)


async def _chunked_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers every request with a chunked body, then closes on the third."""
    served = 0
    while True:
        await _read_request(reader)
        served += 1
        close = served == 3
        writer.write(
            b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n"
            + (b"Connection: close\r\n" if close else b"")
            + b"\r\n"
            + b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
        )
        await writer.drain()
        if close:
            writer.close()
            return


async def _keep_alive_timeout_server(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Answers one request keeping the connection alive, then closes it as idle (as uvicorn
    and BentoML do after their keep-alive timeout)."""
    await _read_request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.close()


def _raw_posts(handler: Callable, count: int, pause_s: float = 0) -> list[tuple[int, bytes]]:
    """POST `count` times with the raw client to a loopback server running `handler`."""

    async def scenario() -> list[tuple[int, bytes]]:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        transport = RawTransport(f"http://127.0.0.1:{port}", 1)
        prepared = transport.request_bytes("/x", b"body", "text/plain")
        answers = []
        for _ in range(count):
            answer = await transport.post(prepared)
            answers.append((answer.status, answer.body))
            await asyncio.sleep(pause_s)
        await transport.close()
        server.close()
        return answers

    return asyncio.run(scenario())


def test_raw_client_reads_chunked_answers_and_reconnects_after_close():
    assert _raw_posts(_chunked_server, 4) == [(201, b"abcde")] * 4


def test_raw_client_never_sends_on_a_connection_the_server_closed_while_idle():
    # The pause outlasts the server's keep-alive: each next request finds its connection closed.
    assert _raw_posts(_keep_alive_timeout_server, 3, pause_s=0.3) == [(200, b"ok")] * 3


def test_raw_client_sends_extra_headers_and_returns_the_answers_headers():
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        seen.append(head)
        await reader.readexactly(4)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Part: 7\r\n\r\nok")
        await writer.drain()
        writer.close()

    async def scenario():
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        transport = RawTransport(f"http://127.0.0.1:{port}", 1)
        headers = {"Inference-Header-Content-Length": "3"}
        answer = await transport.post(transport.request_bytes("/x", b"body", "a/b", headers))
        await transport.close()
        server.close()
        return answer

    answer = asyncio.run(scenario())
    assert (answer.status, answer.body, answer.headers["x-part"]) == (200, b"ok", "7")
    assert b"\r\nInference-Header-Content-Length: 3\r\n" in seen[0]
    assert b"\r\nContent-Length: 4\r\n" in seen[0]


# -- the V2 request kind -----------------------------------------------------------------------

_TRITON_BODY = """
import json, sys
import numpy as np
import tritonclient.http as httpclient
from tritonclient.http._utils import _get_inference_request

images = [bytes.fromhex(h) for h in json.loads(sys.argv[1])]
tensor = httpclient.InferInput("images", [len(images)], "BYTES")
tensor.set_data_from_numpy(np.array(images, dtype=np.object_))  # binary data, the default
outputs = [httpclient.InferRequestedOutput(name) for name in json.loads(sys.argv[2])]
body, size = _get_inference_request([tensor], "", outputs, 0, False, False, 0, None, {"top_k": 5})
print(json.dumps({"body": body.hex(), "header_length": size}))
"""


def test_the_v2_request_is_byte_for_byte_what_tritonclient_http_sends():
    """tritonclient.http (its own venv, `make setup`) builds the same request with its defaults:
    binary input data, binary_data on every requested output, the header length."""
    assert TRITON_PYTHON.exists(), "tests/.venv-tritonclient is missing: run `make setup`"
    images = [encode(random_rgb(16, 16, 3), "JPEG"), b"\x00\x01 not an image"]
    arguments = [json.dumps([i.hex() for i in images]), json.dumps(V2_OUTPUTS)]
    done = subprocess.run(
        [str(TRITON_PYTHON), "-c", _TRITON_BODY, *arguments],
        capture_output=True,
        text=True,
        check=True,
    )
    theirs = json.loads(done.stdout)
    body, content_type, headers = v2_binary_request(images, V2_OUTPUTS, {"top_k": 5})
    assert body == bytes.fromhex(theirs["body"])
    assert headers == {"Inference-Header-Content-Length": str(theirs["header_length"])}
    assert content_type == "application/octet-stream"


@pytest.fixture(scope="module")
def colour_photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One class folder per colour of the colour model, each with a tinted photo."""
    from support.trained import COLOURS, tinted_photo

    root = tmp_path_factory.mktemp("photos")
    for colour in COLOURS:
        (root / colour).mkdir()
        (root / colour / "0.jpg").write_bytes(tinted_photo(colour))
    return root


@pytest.mark.slow
def test_v2_requests_of_the_load_generator_get_the_answers_classify_gives(
    colour_model_root: Path, colour_photos: Path
):
    """A real `graft serve`: each V2 request the load generator builds is answered 200 with
    the photo's colour, the same label, score and top 5 as /classify gives; both kinds run
    through the load generator without errors."""
    import httpx
    from support.server import running_server
    from support.trained import COLOURS

    with running_server(colour_model_root, default_model="colours") as server:
        spec = {"kind": "graft-v2", "url": server.http, "model": "colours"}

        async def v2_answers() -> list[tuple[dict, dict]]:
            target = make_target(spec, 1)
            answers = []
            for colour in COLOURS:
                payload = target.prepare((colour_photos / colour / "0.jpg").read_bytes())
                answers.append(await target.infer(payload))
                assert await target.send(payload) == 1
            await target.close()
            return answers

        answers = asyncio.run(v2_answers())
        for colour, (document, outputs) in zip(COLOURS, answers, strict=True):
            photo = (colour_photos / colour / "0.jpg").read_bytes()
            files = {"images": ("photo.jpg", photo, "image/jpeg")}
            classify = httpx.post(f"{server.http}/classify", files=files, timeout=60).json()
            [result] = classify["results"]
            assert (document["model_name"], document["model_version"]) == ("colours", "1")
            assert outputs["label"] == [colour] == [result["label"]]
            assert outputs["score"] == [pytest.approx(result["score"], abs=1e-6)]
            assert outputs["top_k_label"] == [t["label"] for t in result["top_k"]]
            expected = [pytest.approx(t["score"], abs=1e-6) for t in result["top_k"]]
            assert outputs["top_k_score"] == expected

        for kind in ("graft-v2", "graft-http"):
            runs = asyncio.run(
                run_spec(
                    {
                        "target": {**spec, "kind": kind},
                        "images": {"dir": str(colour_photos), "count": 3},
                        "runs": [closed(2)],
                    }
                )
            )
            assert runs[0]["errors"] == 0 and runs[0]["requests"] > 0, (kind, runs[0])


def test_graft_v2_shares_graft_https_server_start_and_runs_in_quick():
    assert "graft-v2" in selected(parse_args(["--quick"]))
    ctx = Context(QUICK, True, Model("m", 1, REPO, "tiny", 8, 2), REPO, sys.executable)
    calls: list[tuple[list[str], list[str]]] = []

    class Recorder:
        def with_server(self, names, start, measures) -> None:
            calls.append((list(names), sorted(measures)))

        def one(self, name, measure) -> None:
            calls.append(([name], []))

    chosen = selected(parse_args(["--only", "graft-v2,tutorial,graft-http"]))
    for _, step in plan(ctx, chosen):
        step(Recorder())
    assert calls[0][0] == ["graft-http", "graft-v2"]  # one graft start, /classify first
    assert "graft-v2" in calls[0][1] and calls[1][0] == ["tutorial"] and len(calls) == 2


# -- the ceiling and the statistics ---------------------------------------------------------------


def test_ceiling_measures_every_batch_size_with_each_number_of_callers(
    model_dir: Path, image_dir: Path
):
    images = load_images(image_dir, 8)
    rows = measure(model_dir, images, [1, 4], [1, 2], warmup_calls=1, duration_s=0.5)
    assert [(r["batch_size"], r["callers"]) for r in rows] == [(1, 1), (1, 2), (4, 1), (4, 2)]
    assert all(r["calls"] > 0 and r["throughput_ips"] > 0 for r in rows)
    # two callers each keep calling until the deadline, so at least one call each is counted
    assert all(r["calls"] >= 2 for r in rows if r["callers"] == 2)
    assert all(r["throughput_ips"] * 0.5 <= r["batch_size"] * r["calls"] for r in rows)


def _ceiling_row(batch_size: int, callers: int, ips: float, p50: float) -> dict:
    latency = {"p50": p50, "p95": p50, "p99": p50}
    return {
        "batch_size": batch_size,
        "callers": callers,
        "throughput_ips": ips,
        "latency_ms": latency,
        "contended": False,
    }


def test_the_ceiling_is_the_best_row_but_t5_keeps_the_lone_batch_1_call():
    rows = [
        _ceiling_row(1, 1, 30.0, 33.0),
        _ceiling_row(1, 2, 40.0, 50.0),
        _ceiling_row(4, 1, 50.0, 80.0),
        _ceiling_row(4, 2, 58.0, 138.0),
    ]
    summary = ceiling_summary(rows)
    assert (summary["best_throughput_ips"], summary["best_batch_size"]) == (58.0, 4)
    assert summary["best_callers"] == 2
    assert summary["batch1_latency_ms"]["p50"] == 33.0  # one caller, not the two-caller row
    assert ceiling_summary(rows[2:])["batch1_latency_ms"] is None


def test_summarize_counts_only_the_window():
    samples = [Sample(0.5, 0.1), Sample(1.0, 0.2), Sample(1.5, 0.4, "http_503"), Sample(2.5, 0.1)]
    summary = summarize(samples, 1.0, 2.0)
    assert summary.requests == 2 and summary.errors == 1
    assert summary.error_kinds == {"http_503": 1}
    assert summary.throughput_ips == pytest.approx(1.0)
    assert summary.latency_ms["p50"] == pytest.approx(200.0)


def test_poisson_arrivals_have_the_asked_rate():
    offsets = poisson_offsets(rate=200.0, total_s=20.0, seed=1)
    assert len(offsets) == pytest.approx(4000, rel=0.05)
    assert np.all(np.diff(offsets) > 0) and offsets[-1] < 20.0


def test_switch_analysis_separates_steady_switch_and_after():
    steady = [Sample(t / 10, 0.05, None, 1) for t in range(0, 50)]  # 0 .. 4.9 s on v1
    during = [Sample(5 + t / 10, 0.30, None, 1) for t in range(0, 10)]  # slow, still v1
    after = [Sample(6 + t / 10, 0.05, None, 2) for t in range(0, 40)]  # v2 from 6.05 s on
    result = analyze_switch(steady + during + after, (0.0, 10.0), 5.0, 1, 2)
    assert result["switched"] and result["errors"] == 0
    assert result["switch_delay_s"] == pytest.approx(1.05)
    assert result["latency_ms_switch"]["p99"] > result["latency_ms_steady"]["p99"]
    assert result["p99_ratio"] == pytest.approx(300 / 50, rel=0.05)


def test_a_switch_that_never_happens_is_reported():
    samples = [Sample(t / 10, 0.05, None, 1) for t in range(100)]
    result = analyze_switch(samples, (0.0, 10.0), 5.0, 1, 2)
    assert not result["switched"] and result["switch_delay_s"] is None


# -- inputs and failures ---------------------------------------------------------------------------


def test_images_are_taken_round_robin_over_classes(image_dir: Path):
    paths = image_paths(image_dir, 4)
    assert [p.parent.name for p in paths] == ["healthy", "scab", "healthy", "scab"]


def test_missing_image_folder_says_what_to_set(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="GRAFT_BENCH_DATA"):
        image_paths(tmp_path / "nowhere", 4)


def test_a_server_that_dies_at_start_reports_its_log(tmp_path: Path):
    cmd = [sys.executable, "-c", "import sys; print('model folder missing'); sys.exit(3)"]
    with (
        pytest.raises(ServerFailed, match="model folder missing"),
        serve(
            "dying",
            cmd,
            env={},
            ready=lambda: False,
            url="-",
            log_dir=tmp_path,
            cwd=REPO,
            timeout_s=30,
        ),
    ):
        pass


def test_unknown_section_is_refused_with_the_valid_names():
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--only", "warp-drive"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert "warp-drive" in done.stderr and "graft-http" in done.stderr


# -- the report ---------------------------------------------------------------------------------


def _section(name: str, **data) -> dict:
    meta = {
        "date": "2026-01-01 00:00 UTC",
        "commit": "abc",
        "command": "python -m bench",
        "machine": {
            "cpu": "cpu",
            "cores": 2,
            "memory_gib": 24,
            "os": "Linux",
            "python": "3.11",
            "tensorflow": "2.21",
            "bentoml": "1.4",
            "grpcio": "1.85",
        },
    }
    return {"section": name, "meta": meta, "model": {"name": "tiny"}, "ok": True, **data}


def test_report_renders_measured_runs_and_keeps_the_hand_written_text(
    tutorial_url: str, image_dir: Path, tmp_path: Path
):
    spec = {
        "target": {"kind": "tutorial", "url": tutorial_url, "model": "tiny"},
        "images": {"dir": str(image_dir), "count": 8},
        "runs": [closed(1), closed(16)],
    }
    runs = asyncio.run(run_spec(spec))
    results_dir = tmp_path / "results"
    results_dir.mkdir()
    # the same measured runs stand in for two servers, so that T3 has both sides to compare
    for name in ("tutorial", "graft-http"):
        (results_dir / f"{name}.json").write_text(json.dumps(_section(name, runs=runs)))
    document = tmp_path / "BENCHMARKS.md"
    document.write_text(
        f"# Benchmarks\n\nT3: written by a person.\nT11: and T12: too.\n\n{report.BEGIN}\nold\n"
        f"{report.END}\n\ntail kept\n"
    )

    missing = report.render(results_dir, tmp_path / "plots", document)

    text = document.read_text()
    assert "T3: written by a person." in text and "tail kept" in text and "\nold\n" not in text
    assert "tutorial FastAPI" in text and f"{runs[1]['throughput_ips']:.1f}" in text
    assert (tmp_path / "plots" / "throughput_vs_concurrency.png").stat().st_size > 1000
    assert missing == []  # T3, T11, T12 are missed (the same runs) but have written causes


def test_a_missed_target_without_a_written_cause_is_flagged(tmp_path: Path):
    run = {
        "mode": "closed",
        "concurrency": 16,
        "throughput_ips": 10.0,
        "contended": False,
        "latency_ms": {"p50": 1.0, "p95": 1.0, "p99": 1.0},
        "requests": 200,
        "errors": 0,
    }
    results = {
        "graft-http": _section("graft-http", runs=[run]),
        "graft-nobatch": _section("graft-nobatch", runs=[{**run, "throughput_ips": 9.0}]),
    }
    [t2] = [v for v in verdicts(results) if v.target_id == "T2"]
    assert t2.met is False and "1.11 x" in t2.figure
    document = f"# B\n{report.BEGIN}\n{report.END}\n"
    assert report.missing_explanations(document, [t2]) == ["T2"]


def test_a_run_where_nothing_completed_is_not_a_win():
    run = {
        "mode": "closed",
        "concurrency": 16,
        "throughput_ips": 0.0,
        "requests": 0,
        "latency_ms": {"p50": None, "p95": None, "p99": None},
        "errors": 0,
    }
    graft_run = {
        **run,
        "throughput_ips": 10.0,
        "requests": 200,
        "latency_ms": {"p50": 1.0, "p95": 1.0, "p99": 1.0},
    }
    results = {
        "graft-http": _section("graft-http", runs=[graft_run]),
        "tutorial": _section("tutorial", runs=[run]),
    }
    [t3] = [v for v in verdicts(results) if v.target_id == "T3"]
    assert t3.met is None and "not measured" in t3.figure


def _c16(ips: float, p99: float = 500.0, batch: float | None = None) -> dict:
    return {
        "mode": "closed",
        "concurrency": 16,
        "throughput_ips": ips,
        "contended": False,
        "latency_ms": {"p50": p99 / 2, "p95": p99, "p99": p99},
        "requests": 400,
        "errors": 0,
        "mean_batch_size": batch,
    }


def _graft_pair(http_ips: float, v2_ips: float, v2_start: float = 12.5) -> dict:
    start = {"pid": 4242, "ready_at": 12.5}
    return {
        "graft-http": _section("graft-http", runs=[_c16(http_ips, batch=3.5)], server=start),
        "graft-v2": _section(
            "graft-v2",
            runs=[_c16(v2_ips, 640.0, batch=3.25)],
            server={**start, "ready_at": v2_start},
        ),
    }


@pytest.mark.parametrize(
    ("http_ips", "v2_ips", "met", "ratio"),
    [(40.0, 39.0, True, "0.97 x"), (40.0, 38.0, True, "0.95 x"), (40.0, 37.0, False, "0.93 x")],
)
def test_the_v2_target_is_095_of_classify_at_16_clients(http_ips, v2_ips, met, ratio):
    [t9] = [v for v in verdicts(_graft_pair(http_ips, v2_ips)) if v.target_id == "T9"]
    assert t9.met is met and ratio in t9.figure and f"{v2_ips:.1f} vs {http_ips:.1f}" in t9.figure


def test_the_v2_target_needs_both_figures_from_one_server_start():
    [t9] = [v for v in verdicts(_graft_pair(40.0, 39.0, v2_start=99.0)) if v.target_id == "T9"]
    assert t9.met is None and "different starts" in t9.figure
    [t9] = [v for v in verdicts({}) if v.target_id == "T9"]
    assert t9.met is None and "not measured" in t9.figure


def test_the_report_renders_the_v2_rows():
    results = _graft_pair(40.0, 37.0)
    assert "| graft V2 REST (binary) | 37.0 | – |" in report.throughput_table(results)
    assert any(
        line.startswith("| graft V2 REST (binary) | 16 | 320.0 |") and "| 640.0 | 0 |" in line
        for line in report.latency_table(results)
    )
    assert report.batch_table(results)[2:] == [
        "| graft HTTP | 16 | 3.50 |",
        "| graft V2 REST (binary) | 16 | 3.25 |",
    ]
    [row] = [line for line in report.targets_table(verdicts(results)) if line.startswith("| T9")]
    assert "37.0 vs 40.0 img/s = 0.93 x" in row and "**MISSED**" in row
    document = f"# B\n{report.BEGIN}\n{report.END}\n"
    assert report.missing_explanations(document, verdicts(results)) == ["T9"]


def test_training_targets_are_judged_on_training_bench_figures():
    figures = {
        "default": {
            "accuracy": 0.991, "macro_f1": 0.96, "wall_s": 700.0, "ece_after": 0.012,
            "ood_share": 0.04,
        },
        "few_shot_10": {"accuracy": 0.9},
        "ood": {"non_leaf_flagged": 0.97, "test_leaves_flagged": 0.03},
    }  # fmt: skip
    rows = [
        v
        for v in verdicts({"training": _section("training", figures=figures)})
        if v.target_id.startswith("T8")
    ]
    assert [(v.target_id, v.met) for v in rows] == [
        ("T8.1", True),
        ("T8.2", False),
        ("T8.3", True),
        ("T8.6", False),
        ("T8.7", True),
        ("T8.8", True),
        ("T8.9", False),
        ("T8.10", True),
        ("T8.4", True),
        ("T8.5", None),
    ]
    assert rows[0].figure == "0.991" and "phase1_epoch_speedup" in rows[-1].figure


def test_the_report_names_the_ceiling_row_by_batch_and_callers():
    rows = [_ceiling_row(4, 1, 50.0, 80.0), _ceiling_row(4, 2, 58.0, 138.0)]
    results = {"ceiling": _section("ceiling", **ceiling_summary(rows))}
    assert report.ceiling_table(results)[2:] == [
        "| tensorflow | 4 | 1 | – | 50.0 | 80.0 | 80.0 | – |",
        "| tensorflow | 4 | 2 | – | 58.0 | 138.0 | 138.0 | – |",
    ]
    assert report.throughput_table(results)[-1].startswith(
        "| in-process ceiling, tensorflow (batch 4 x 2 callers) |"
    )


def test_a_ceiling_measured_before_callers_renders_as_one_caller():
    old_row = {k: v for k, v in _ceiling_row(4, 1, 50.1, 80.0).items() if k != "callers"}
    old = _section("ceiling", rows=[old_row], best_throughput_ips=50.1, best_batch_size=4)
    results = {"ceiling": old}
    assert report.ceiling_table(results)[2] == "| tensorflow | 4 | 1 | – | 50.1 | 80.0 | 80.0 | – |"
    assert report.throughput_table(results)[-1].startswith(
        "| in-process ceiling, tensorflow (batch 4 x 1 caller) |"
    )


def test_a_failed_section_stays_on_one_table_row():
    failed = _section("kserve", ok=False, error="ServerFailed: exited\nTraceback line\n|pipe")
    lines = report.runs_table({"kserve": failed})
    assert len(lines) == 3 and "FAILED: ServerFailed: exited" in lines[2]


def test_profile_summary_attributes_samples_to_the_innermost_process(tmp_path: Path):
    from bench.profile import summarize

    raw = tmp_path / "raw.txt"
    raw.write_text(
        'process 1:"graft serve";process 2:"python -m w --service-name graft-inference";'
        "run (a.py:1);infer (b.py:2) 30\n"
        'process 1:"graft serve";process 3:"python -m w --service-name graft";'
        "run (a.py:1);parse (c.py:3) 10\n"
        "garbage line without a count\n"
    )
    text = summarize(raw)
    assert "'graft-inference': 30" in text and "'graft': 10" in text
    assert "| 100.0 | `infer (b.py:2)` |" in text


# -- the tutorial app on the ONNX artefact ---------------------------------------------------


def _tutorial_app(app: str, model_dir: Path, logs: Path):
    port = free_port()
    cmd = [sys.executable, "-m", "uvicorn", app, "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    return serve(
        app.split(":")[0].rsplit(".", 1)[-1],
        cmd,
        env={"MODEL_DIR": str(model_dir)},
        ready=http_ok(f"{url}/healthz"),
        url=url,
        log_dir=logs,
        cwd=REPO,
        timeout_s=120,
    )


def test_the_onnx_tutorial_app_answers_as_the_savedmodel_one(
    model_dir: Path, tutorial_url: str, tmp_path: Path
):
    """A real request on loopback: the ONNX app (preprocess + onnx/model.onnx on ONNX Runtime)
    gives the labels and probabilities the TensorFlow app gives; junk is its 400."""
    import httpx

    assert (model_dir / "onnx" / "model.onnx").is_file()
    photo = encode(random_rgb(48, 40, 7), "JPEG")
    with _tutorial_app("bench.peers.tutorial_onnx_app:app", model_dir, tmp_path) as server:
        answers = [
            httpx.post(
                f"{url}/predict?top_k=2", files={"file": ("a.jpg", photo)}, timeout=60
            ).json()
            for url in (server.url, tutorial_url)
        ]
        junk = httpx.post(f"{server.url}/predict", files={"file": ("a.jpg", b"nope")}, timeout=60)
    onnx, saved_model = answers
    assert onnx["label"] == saved_model["label"] and onnx["label"] in ("a", "b")
    assert [t["label"] for t in onnx["top_k"]] == [t["label"] for t in saved_model["top_k"]]
    for ours, theirs in zip(onnx["top_k"], saved_model["top_k"], strict=True):
        assert ours["score"] == pytest.approx(theirs["score"], abs=1e-4)
    assert junk.status_code == 400 and junk.json()["detail"] == "not a decodable image"


def test_a_model_without_its_onnx_file_skips_the_onnx_peer_with_one_line(tmp_path: Path):
    from bench.servers import Unavailable, tutorial

    model = Model("old", 3, tmp_path, "tiny", 8, 2)
    expected = r"^old v3 has no onnx/model.onnx .*export it again"
    with pytest.raises(Unavailable, match=expected), tutorial(model, "tutorial-onnx"):
        pass


# -- the ceiling per runtime ------------------------------------------------------------------


def test_the_onnx_ceiling_runs_the_serving_path_and_agrees_with_serving_default(
    model_dir: Path, image_dir: Path
):
    """preprocess + the ONNX network (threads per call as graft gives that many batch
    threads) gives serving_default's probabilities, and measures a row per batch x callers."""
    import tensorflow as tf

    from bench.ceiling import serving_path
    from service.runtime.networks import default_threads

    images = load_images(image_dir, 4)
    loaded = tf.saved_model.load(str(model_dir))
    fast = serving_path("onnxruntime", model_dir, loaded, 1)(images)
    reference = serving_path("tensorflow", model_dir, loaded, 1)(images)
    assert fast.shape == reference.shape == (4, 2)
    np.testing.assert_allclose(fast, reference, atol=1e-4)

    rows = measure(model_dir, images, [1, 2], [1, 2], 1, 0.3, runtime="onnxruntime")
    assert [(r["runtime"], r["batch_size"], r["callers"]) for r in rows] == [
        ("onnxruntime", 1, 1),
        ("onnxruntime", 1, 2),
        ("onnxruntime", 2, 1),
        ("onnxruntime", 2, 2),
    ]
    assert [r["threads"] for r in rows] == [default_threads(1), default_threads(2)] * 2
    assert all(r["calls"] > 0 and "contended" in r for r in rows)


def test_the_ceiling_section_measures_tensorflow_and_graft_s_runtime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from bench.sections import ceiling_runtimes

    monkeypatch.delenv("GRAFT_RUNTIME", raising=False)  # graft's default: auto

    onnx = tmp_path / "onnx" / "model.onnx"
    onnx.parent.mkdir()
    onnx.write_bytes(b"")
    ctx = Context(QUICK, True, Model("m", 1, tmp_path, "tiny", 8, 2), REPO, sys.executable)
    assert ceiling_runtimes(ctx) == (["tensorflow", "onnxruntime"], {})
    on_tf = replace(ctx, graft_env={"GRAFT_RUNTIME": "tensorflow"})
    assert ceiling_runtimes(on_tf) == (["tensorflow"], {})
    onnx.unlink()
    runtimes, skipped = ceiling_runtimes(ctx)
    assert runtimes == ["tensorflow"] and skipped == {"onnxruntime": "m v1 has no ONNX file"}


def test_each_runtime_has_its_best_row_and_the_fastest_is_the_ceiling():
    rows = [
        {**_ceiling_row(1, 1, 30.0, 33.0), "runtime": "tensorflow"},
        {**_ceiling_row(4, 2, 58.0, 138.0), "runtime": "tensorflow"},
        {**_ceiling_row(1, 1, 70.0, 14.0), "runtime": "onnxruntime"},
        {**_ceiling_row(4, 2, 95.0, 84.0), "runtime": "onnxruntime"},
    ]
    summary = ceiling_summary(rows)
    assert summary["fastest_runtime"] == "onnxruntime" and summary["best_throughput_ips"] == 95.0
    assert summary["runtimes"]["tensorflow"]["best_throughput_ips"] == 58.0
    assert summary["runtimes"]["onnxruntime"]["batch1_latency_ms"]["p50"] == 14.0
    lines = report.throughput_table({"ceiling": _section("ceiling", **summary)})
    assert lines[-2].startswith("| in-process ceiling, tensorflow (batch 4 x 2 callers) |")
    assert lines[-2].endswith("| 0.61 |") and lines[-1].endswith("| 1.00 |")


# -- the contention detector ------------------------------------------------------------------


def test_the_load_generator_meters_cpu_over_the_window_not_until_the_last_answer():
    """Answers that arrive after the window closes (their server still busy with them) used to
    extend the machine-wide CPU count past the window, while the server's CPU stopped at it:
    a quiet machine read as contended. The meter now covers the window and says so."""

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answers its one request 1.5 s late, then closes (the client reconnects)."""
        await _read_request(reader)
        await asyncio.sleep(1.5)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
        await writer.drain()
        writer.close()

    async def scenario():
        from bench.loadgen import closed_loop

        server = await asyncio.start_server(slow, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        target = make_target({"kind": "tutorial", "url": url, "model": "-"}, 2)
        payloads = [target.prepare(b"jpeg")]
        measured = await closed_loop(target, payloads, 2, warmup_s=0.1, duration_s=0.5)
        await target.close()
        server.close()
        return measured

    samples, window, cpu = asyncio.run(scenario())
    last_answer = max(s.start + s.latency_s for s in samples)
    # the meter wakes at the window's edges (a busy machine may wake it a little late) ...
    assert -0.01 < cpu["cpu_window"][0] - window[0] < 0.4
    assert -0.01 < cpu["cpu_window"][1] - window[1] < 0.4
    # ... and not at the last answer, which came 1.5 s after its request, long after the end
    assert last_answer - cpu["cpu_window"][1] > 0.5


def _sampler(cores_busy: float, harness_cores: float):
    """A TreeSampler holding samples every 0.5 s of a server tree using `cores_busy` cores
    and this process `harness_cores`: the detector's input, without any live process."""
    from bench.procs import TreeSample, TreeSampler

    points = [
        TreeSample(t / 2, 1 << 20, 1 << 20, cores_busy * t / 2, harness_cores * t / 2)
        for t in range(21)
    ]
    sampler = TreeSampler(2**22 + 1, samples=points)  # a pid no process has: nothing added
    sampler.stop()
    return sampler


@pytest.mark.parametrize(("foreign_cores", "contended"), [(0.0, False), (0.3, True)])
def test_contention_counts_only_other_processes_over_the_metered_span(foreign_cores, contended):
    """The server using (almost) every core, the metered span between two samples: only CPU
    that none of the benchmark's processes used counts as contention. Read with the nearest
    sample and without the harness's own CPU, the quiet case was 15 % 'foreign'."""
    import os

    from bench.sections import annotate

    cores = os.cpu_count() or 1
    server, harness, loadgen = 0.95 * cores, 0.02 * cores, 0.1
    sampler = _sampler(server, harness)
    start, end = 2.26, 5.24
    span = end - start
    result = {
        "window": [start, end],
        "cpu_window": [start, end],
        "loadgen_cpu_s": loadgen,
        "machine_busy_cpu_s": (server + harness + foreign_cores * cores) * span + loadgen,
    }
    annotate(result, sampler)
    assert result["contended"] is contended
    assert result["foreign_cpu_share"] == pytest.approx(foreign_cores, abs=0.01)
    assert result["server_cpu_cores"] == pytest.approx(server, rel=0.01)


def test_a_window_outside_the_samples_reads_the_nearest_end():
    from bench.procs import interpolate

    points = [(1.0, 10.0), (2.0, 20.0), (4.0, 20.0)]
    assert [interpolate(points, t) for t in (0.0, 1.5, 3.0, 9.0)] == [10.0, 15.0, 20.0, 20.0]


# -- sections that cannot run here ----------------------------------------------------------


def test_quick_without_kserve_s_venv_skips_it_with_one_line_and_passes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
):
    """A fresh clone has no bench/.venv-kserve: --quick must not fail on it (it has no time
    to build it), but say in one line how to get it; the section is recorded as skipped."""
    import bench.__main__ as bench_main
    from bench import servers

    monkeypatch.setattr(servers, "KSERVE_PYTHON", tmp_path / "no-venv" / "bin" / "python")
    monkeypatch.setattr(bench_main, "RESULTS_DIR", tmp_path)
    ctx = Context(QUICK, True, Model("m", 1, tmp_path, "tiny", 8, 2), tmp_path, sys.executable)
    runner = bench_main.Runner(ctx, _section("kserve")["meta"])
    for _, step in plan(ctx, ["kserve"]):
        step(runner)
    assert (runner.failed, runner.skipped) == ([], ["kserve"])
    lines = [line for line in capsys.readouterr().out.splitlines() if "skipped" in line]
    assert len(lines) == 1 and "bench/peers/setup_kserve.sh" in lines[0], lines
    saved = json.loads((tmp_path / "kserve.json").read_text())
    assert saved["ok"] is False and saved["skipped"].startswith("KServe's venv is missing")
    row = report.runs_table({"kserve": saved})[2]
    assert "| skipped: KServe's venv is missing" in row and "FAILED" not in row
    assert (tmp_path / "no-venv").exists() is False  # nothing was built


# -- issue 15's targets ---------------------------------------------------------------------


def _run(concurrency: int, ips: float, p50: float = 40.0, p99: float = 500.0) -> dict:
    return {
        **_c16(ips, p99),
        "concurrency": concurrency,
        "latency_ms": {"p50": p50, "p95": p99, "p99": p99},
    }


def _issue15_results(graft_ips: float, peer_ips: float, graft_p99: float = 400.0) -> dict:
    levels = (1, 4, 16, 64)
    server = {"runtime": "onnxruntime", "memory_under_load": {"pss_mib": 1100.0}}
    results = {
        "graft-http": _section(
            "graft-http",
            runs=[_run(c, graft_ips, p50=18.0, p99=graft_p99) for c in levels],
            server=server,
        ),
        "ceiling": _section(
            "ceiling",
            **ceiling_summary(
                [
                    {**_ceiling_row(4, 2, 40.0, 80.0), "runtime": "tensorflow"},
                    {**_ceiling_row(1, 1, 70.0, 14.0), "runtime": "onnxruntime"},
                    {**_ceiling_row(4, 2, 100.0, 84.0), "runtime": "onnxruntime"},
                ]
            ),
        ),
    }
    for peer, pss in (("tutorial", 1200.0), ("tutorial-onnx", 1000.0), ("kserve", 1300.0)):
        results[peer] = _section(
            peer,
            runs=[_run(c, peer_ips, p99=500.0) for c in levels],
            server={"memory_under_load": {"pss_mib": pss}},
        )
    return results


def _verdict(results: dict, tid: str):
    [verdict] = [v for v in verdicts(results) if v.target_id == tid]
    return verdict


def test_graft_is_judged_against_the_fastest_runtime_and_against_tensorflow():
    results = _issue15_results(graft_ips=86.0, peer_ips=50.0)
    t1, t10 = _verdict(results, "T1"), _verdict(results, "T10")
    assert t1.met is True and "86.0 / 100.0 img/s (onnxruntime, batch 4 x 2) = 0.86 x" in t1.figure
    assert t10.met is True and "(tensorflow, batch 4 x 2) = 2.15 x" in t10.figure
    slower = _issue15_results(graft_ips=59.0, peer_ips=50.0)
    assert (_verdict(slower, "T1").met, _verdict(slower, "T10").met) == (False, False)


def test_one_client_is_judged_against_the_same_runtime_s_batch_1_latency():
    results = _issue15_results(graft_ips=86.0, peer_ips=50.0)  # p50 18 ms vs onnxruntime 14
    t5 = _verdict(results, "T5")
    assert t5.met is True and "onnxruntime 14.0 + 5 ms (overhead +4.0 ms)" in t5.figure
    results["graft-http"]["server"]["runtime"] = "tensorflow"  # tensorflow's row: no batch 1
    assert _verdict(results, "T5").met is None
    del results["graft-http"]["server"]["runtime"]
    assert "graft's runtime" in _verdict(results, "T5").figure


def test_graft_must_lead_every_peer_at_every_level_and_on_p99_at_16():
    ahead = _issue15_results(graft_ips=60.0, peer_ips=50.0)
    assert _verdict(ahead, "T11").met is True and _verdict(ahead, "T12").met is True
    assert "c=64: 60.0 vs tutorial 50.0, tutorial-onnx 50.0, kserve 50.0 img/s" in (
        _verdict(ahead, "T11").figure
    )
    behind_once = _issue15_results(graft_ips=60.0, peer_ips=50.0, graft_p99=600.0)
    behind_once["kserve"]["runs"][1]["throughput_ips"] = 61.0  # at 4 clients
    assert _verdict(behind_once, "T11").met is False and _verdict(behind_once, "T12").met is False
    no_kserve = _issue15_results(graft_ips=60.0, peer_ips=50.0)
    del no_kserve["kserve"]
    t11 = _verdict(no_kserve, "T11")
    assert t11.met is None and "not measured: kserve c1, kserve c4" in t11.figure


def test_graft_s_memory_is_judged_against_the_tutorial_app_on_its_runtime():
    results = _issue15_results(graft_ips=60.0, peer_ips=50.0)
    t13 = _verdict(results, "T13")  # 1100 vs the ONNX tutorial's 1000
    assert t13.met is True and "1100 vs tutorial-onnx 1000 MiB = 1.10 x" in t13.figure
    results["graft-http"]["server"]["runtime"] = "tensorflow"  # vs 1200: still met
    assert "tutorial 1200" in _verdict(results, "T13").figure
    results["graft-http"]["server"].update(runtime="onnxruntime")
    results["graft-http"]["server"]["memory_under_load"]["pss_mib"] = 1250.0
    assert _verdict(results, "T13").met is False


# -- the batcher sweep ----------------------------------------------------------------------


def test_the_sweep_tries_every_combination_in_order():
    from bench.sweep import grid, parse_args

    args = parse_args(["--set", "GRAFT_MAX_BATCH_SIZE=2,4", "--set", "GRAFT_BATCH_THREADS=1,3"])
    assert grid(args.settings) == [
        {"GRAFT_MAX_BATCH_SIZE": "2", "GRAFT_BATCH_THREADS": "1"},
        {"GRAFT_MAX_BATCH_SIZE": "2", "GRAFT_BATCH_THREADS": "3"},
        {"GRAFT_MAX_BATCH_SIZE": "4", "GRAFT_BATCH_THREADS": "1"},
        {"GRAFT_MAX_BATCH_SIZE": "4", "GRAFT_BATCH_THREADS": "3"},
    ]
    assert args.levels == (16,)
    with pytest.raises(SystemExit):
        parse_args(["--set", "GRAFT_MAX_BATCH_SIZE"])


def test_the_sweep_table_puts_the_best_first_and_keeps_failures():
    from bench.sweep import table

    def point(size: str, ips: float, batch: float) -> dict:
        run = {**_run(16, ips, p99=300.0), "mean_batch_size": batch}
        return {
            "ok": True,
            "env": {"GRAFT_MAX_BATCH_SIZE": size},
            "round": 1,
            "runs": [run],
            "server": {"runtime": "onnxruntime"},
        }

    failed = {
        "ok": False,
        "env": {"GRAFT_MAX_BATCH_SIZE": "64"},
        "round": 1,
        "error": "ServerFailed: not ready",
    }
    lines = table([point("2", 40.0, 1.9), failed, point("4", 45.5, 3.6)], (16,))
    assert lines[2] == "| GRAFT_MAX_BATCH_SIZE=4 | 1 | onnxruntime | 45.5 | 300 | 3.60 | no |"
    assert lines[3].startswith("| GRAFT_MAX_BATCH_SIZE=2 | 1 | onnxruntime | 40.0 |")
    assert lines[4] == "| GRAFT_MAX_BATCH_SIZE=64 | 1 | FAILED: ServerFailed: not ready |"
