"""The soak (`python -m bench.soak`): its hostile inputs, its checks, and a short real run.

The hostile inputs are checked for being what they claim (sizes in their headers, tar headers,
EXIF), the verdict for failing on each kind of finding, and one short soak against a real
`graft serve` of a tiny model sends every input, over HTTP and gRPC, and must pass.
"""

import gzip
import io
import json
import shutil
import struct
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from bench import soak
from bench.soak_inputs import (
    bad_cases,
    exif_rotated_tall_jpeg,
    gif_with_huge_second_frame,
    long_name_chain_push,
    one_bit_png,
    pax_bomb_push,
)
from bench.soak_watch import series, summarize_livez
from service.settings import GraftSettings

PHOTO = soak.good_images(1)[0]


def test_the_hostile_inputs_cover_issue_17_and_expect_no_5xx() -> None:
    cases = bad_cases(PHOTO, token="t" * 32, grpc_on=True)
    assert len({case.name for case in cases}) == len(cases)
    assert {"1", "2", "3", "4", "5", "6", "7", "11", "13", "15", "16"} <= {c.item for c in cases}
    for case in cases:
        assert case.expected, case.name
        assert not any(o.startswith("5") and o != "503" for o in case.expected), case.name
    assert {c.name for c in bad_cases(PHOTO, None, False)} < {c.name for c in cases}
    assert any("40 MP" in case.name for case in cases if case.heavy)


def test_the_hostile_payloads_are_what_they_claim() -> None:
    limit = GraftSettings().max_image_pixels
    at_limit, over = (Image.open(io.BytesIO(one_bit_png(8000, h))) for h in (5000, 5001))
    assert at_limit.size[0] * at_limit.size[1] == limit < over.size[0] * over.size[1]
    tall = Image.open(io.BytesIO(exif_rotated_tall_jpeg()))
    assert tall.size == (300, 8000) and tall.getexif()[0x0112] == 6
    gif = gif_with_huge_second_frame()
    second = gif.index(b"\x2c", gif.index(b"\x2c") + 1)  # the second image descriptor
    assert struct.unpack("<HH", gif[second + 5 : second + 9]) == (30_000, 30_000)
    pax = tarfile.TarInfo.frombuf(gzip.decompress(pax_bomb_push())[:512], "utf-8", "strict")
    assert (pax.type, pax.size) == (tarfile.XHDTYPE, 6 * 2**30)
    raw = gzip.decompress(long_name_chain_push())
    types = Counter(raw[offset + 156 : offset + 157] for offset in range(0, len(raw), 512))
    assert types[tarfile.GNUTYPE_LONGNAME] == 1500


def test_metrics_series_fold_buckets_and_see_new_label_sets() -> None:
    page = (
        "# HELP a_seconds x\n"
        'a_seconds_bucket{le="0.1",model="m"} 1\n'
        'a_seconds_bucket{model="m",le="+Inf"} 1\n'
        'a_seconds_sum{model="m"} 0.1\n'
        'a_seconds_count{model="m"} 1\n'
        "b_total 3\n"
    )
    assert series(page) == {'a_seconds{model="m"}', "b_total{}"}
    assert len(series(page + 'a_seconds_count{model="m0a1b"} 1\n')) == 3


def _result(**changes: object) -> dict:
    args = soak.parse_args(["--url", "http://x"])
    tally = soak.Tally()
    tally.statuses.update({200: 10, 400: 2})
    watched = {
        "livez": summarize_livez([0.01, 0.02], {}),
        "metrics": {"growth": 0, "made_up": []},
        "memory_mib": {},
    }
    for key, value in changes.items():
        if key in watched:
            watched[key] = value
        else:
            setattr(tally, key, value)
    return soak.verdict(tally, [(0.0, 100), (1.0, 101)], args, watched)


@pytest.mark.parametrize(
    ("change", "check"),
    [
        ({"statuses": Counter({200: 10, 500: 1})}, "no_5xx_but_intended_503"),
        ({"unexpected": ["1 MB model name: 500"]}, "bad_inputs_as_expected"),
        ({"good_not_200": Counter({503: 1})}, "good_inputs_all_200"),
        ({"livez": summarize_livez([0.01, 1.5], {})}, "livez_within_limit"),
        ({"livez": summarize_livez([0.01], {"ReadTimeout": 1})}, "livez_within_limit"),
        ({"metrics": {"growth": 40, "made_up": []}}, "metrics_series_stable"),
        (
            {"metrics": {"growth": 1, "made_up": ['a{model="m0a1b2c3d4e5f"}']}},
            "metrics_series_stable",
        ),
    ],
)
def test_the_verdict_fails_on_each_kind_of_finding(change: dict, check: str) -> None:
    assert _result()["passed"]
    failed = _result(**change)
    assert not failed["passed"]
    assert [name for name, ok in failed["checks"].items() if not ok] == [check]


@pytest.mark.slow
def test_a_short_soak_sends_every_hostile_input_and_passes(
    tmp_path: Path, colour_model_root: Path
) -> None:
    """Against a real `graft serve` (HTTP, gRPC, an admin token): every input at least once,
    each answered as it must be, /livez probed throughout, memory recorded per process, the
    rate a fraction of the capacity measured with the hostile inputs in the mix. The machine is
    shared, so the /livez bound here is loose; the real soak holds it to 1 s."""
    root = tmp_path / "models"
    shutil.copytree(colour_model_root, root)
    out = tmp_path / "soak.json"
    argv = [
        "--model-root", str(root), "--model", "colours", "--capacity-s", "3", "--load", "0.3",
        "--duration-s", "6",
        "--bad-every", "2", "--worst-burst", "1", "--header-timeout-s", "2",
        "--body-timeout-s", "3", "--livez-limit-s", "10", "--out", str(out),
    ]  # fmt: skip
    code = soak.main(argv)
    result = json.loads(out.read_text())["layouts"]["one"]
    assert code == 0 and result["passed"], json.dumps(result["checks"] | result["unexpected"])
    assert result["capacity_rps"] > 0
    assert result["rate_rps"] == pytest.approx(0.3 * result["capacity_rps"])
    sent = result["bad_outcomes"]
    for kind in result["bad_kinds"]:
        assert set(sent[kind["name"]]) <= set(kind["expected"]), kind["name"]
    assert {kind["name"] for kind in result["bad_kinds"]} == set(sent)
    assert result["livez"]["samples"] > 10 and not result["livez"]["failures"]
    assert result["metrics"]["growth"] <= 16 and not result["metrics"]["made_up"]
    entry = result["memory_mib"]["entry"]  # the one process: HTTP, gRPC and the models
    assert entry["hwm_end"] >= entry["rss_peak"] > 0 and entry["pss_peak"] > 0


def test_soak_one_sizes_the_heavy_cases_by_default_and_refuses_unknown_names() -> None:
    from bench.soak_one import chosen

    cases = bad_cases(PHOTO, token="t" * 32, grpc_on=True)
    assert chosen(cases, None) == [case for case in cases if case.heavy]
    assert [case.name for case in chosen(cases, ["zero bytes"])] == ["zero bytes"]
    with pytest.raises(SystemExit, match="no such case"):
        chosen(cases, ["no such input"])
