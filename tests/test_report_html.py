"""report.html, the error-analysis report: from a real tiny `graft train` (and `graft
evaluate`) run, a page that parses, holds every section, embeds its images, references no
outside host, escapes the user's class folder names and finds a test image copied into the
training split."""

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from training_images import make_dataset
from typer.testing import CliRunner, Result

from graft_cli import app
from training import duplicates
from training.duplicates import NEAR_DUPLICATE_SIMILARITY, nearest
from training.error_report import REPORT_FILE, _signatures
from training.report_html import Markup, esc, table
from training.report_sections import HEADINGS

runner = CliRunner()
TINY = ["--image-size", "64", "--epochs", "2", "--fine-tune-epochs", "1", "--batch-size", "8"]
ODD_CLASS = "sq<b>&are"  # a valid folder name that is markup if not escaped


class Page(HTMLParser):
    """What a test checks of a page: headings, attributes that load or link, scripts, and the
    text and table rows of each section (keyed by the id of its h2 / h3)."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.headings: list[str] = []
        self.sources: list[str] = []  # every src / href / srcset / action / data value
        self.tags: set[str] = set()
        self.text: dict[str, list[str]] = {}
        self.rows: dict[str, list[list[str]]] = {}
        self.images: dict[str, int] = {}
        self._section = "top"
        self._in: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        values = dict(attrs)
        for name in ("src", "href", "srcset", "action", "data", "poster"):
            if values.get(name):
                self.sources.append(str(values[name]))
        if tag in ("h2", "h3") and values.get("id"):
            self._section = str(values["id"])
        if tag == "tr":
            self.rows.setdefault(self._section, []).append([])
        if tag in ("td", "th"):
            self.rows.setdefault(self._section, [[]])[-1].append("")
        if tag == "img":
            self.images[self._section] = self.images.get(self._section, 0) + 1
        self._in.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in self._in:
            while self._in.pop() != tag:
                pass

    def handle_data(self, data: str) -> None:
        self.text.setdefault(self._section, []).append(data)
        if self._in and self._in[-1] in ("h1", "h2", "h3"):
            self.headings.append(data.strip())
        if "td" in self._in or "th" in self._in:
            row = self.rows[self._section][-1]
            row[-1] += data

    def section_text(self, anchor: str) -> str:
        return " ".join(self.text.get(anchor, []))


def _graft(*args: object) -> Result:
    return runner.invoke(app, [str(a) for a in args])


def _last_json(result: Result) -> dict:
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """A three-class folder where one class is named like markup, every circle has a byte
    copy (split seed 1 puts both test circles' copies in the training split), and one file
    is broken."""
    tmp = tmp_path_factory.mktemp("report")
    data = make_dataset(tmp / "data", per_class=8)
    (data / "square").rename(data / ODD_CLASS)
    for path in sorted((data / "circle").iterdir()):
        shutil.copyfile(path, path.with_name(f"copy-{path.name}"))
    (data / "circle" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    result = _graft(
        "train", data, "--name", "shapes", "--model-root", tmp / "models",
        "--report-dir", tmp / "report", "--quiet", "--seed", "1", *TINY,
    )  # fmt: skip
    return data, tmp, _last_json(result)


def _page(path: Path) -> tuple[str, Page]:
    text = path.read_text("utf-8")
    return text, Page(text)


def _assert_self_contained(page: Page) -> None:
    assert "script" not in page.tags and "link" not in page.tags and "iframe" not in page.tags
    assert page.sources, "the page has no images at all"
    for source in page.sources:
        assert source.startswith(("data:image/png;base64,", "data:image/jpeg;base64,", "#")), (
            source[:80]
        )
        assert "http://" not in source and "https://" not in source and "//" not in source[:8]


def test_train_writes_one_self_contained_report(trained: tuple[Path, Path, dict]) -> None:
    _, tmp, out = trained
    report = tmp / "report" / REPORT_FILE
    assert out["report"]["html"] == str(report)  # the last stdout line names it
    text, page = _page(report)
    assert text.startswith("<!DOCTYPE html>")
    assert "script-src" not in text and "default-src 'none'" in text  # the CSP forbids fetching
    for heading in HEADINGS.values():
        assert heading in page.headings, heading
    _assert_self_contained(page)
    assert page.images["confusion"] >= 1 and page.images["curves"] >= 1
    assert page.images["calibration"] >= 1
    assert json.loads((tmp / "report" / "timings.json").read_text())["report_html"] > 0


def test_class_folder_names_are_escaped(trained: tuple[Path, Path, dict]) -> None:
    _, tmp, _ = trained
    text, page = _page(tmp / "report" / REPORT_FILE)
    assert ODD_CLASS not in text and "<b>" not in text
    assert "sq&lt;b&gt;&amp;are" in text
    # Read back as text, it is the folder's name: in the per-class table and the balance.
    assert ODD_CLASS in [row[0] for row in page.rows["per-class"]]
    assert ODD_CLASS in [row[0] for row in page.rows["balance"]]


def test_a_test_image_copied_into_train_is_reported(trained: tuple[Path, Path, dict]) -> None:
    _, tmp, _ = trained
    split = json.loads((tmp / "report" / "split.json").read_text())
    train = {row["path"] for row in split["train"]}

    def twin(path: str) -> str:
        folder, name = path.rsplit("/", 1)
        copy = name.removeprefix("copy-") if name.startswith("copy-") else f"copy-{name}"
        return f"{folder}/{copy}"

    expected = {(row["path"], twin(row["path"])) for row in split["test"]}
    expected = {pair for pair in expected if pair[1] in train}
    assert expected, "the seeded split put no test circle's copy in train: change the data"
    _, page = _page(tmp / "report" / REPORT_FILE)
    rows = page.rows["duplicates"][1:]  # after the header
    reported = {(row[0], row[2]): float(row[5]) for row in rows}
    for pair in expected:
        assert pair in reported, (pair, reported)
        assert reported[pair] > 0.999  # the same pixels through the same network
    assert page.images["duplicates"] >= 2 * len(expected)


def test_skipped_files_and_class_balance(trained: tuple[Path, Path, dict]) -> None:
    _, tmp, _ = trained
    _, page = _page(tmp / "report" / REPORT_FILE)
    skipped = page.rows["skipped"]
    assert [row[0] for row in skipped[1:]] == ["circle/broken.jpg"]
    header, *rows = page.rows["balance"]
    assert header[:5] == ["class", "train", "val", "test", "readable images"]
    counts = {row[0]: [int(v) for v in row[1:5]] for row in rows}
    assert counts["circle"][3] == 16 and counts["triangle"][3] == 8
    assert all(train + val + test == total for train, val, test, total in counts.values())


def test_highest_loss_images_carry_their_grad_cam(trained: tuple[Path, Path, dict]) -> None:
    _, tmp, out = trained
    _, page = _page(tmp / "report" / REPORT_FILE)
    test = json.loads((tmp / "report" / "split.json").read_text())["test"]
    shown = min(8, len(test))  # the 8 highest-loss test images
    if "explain" in _signatures(Path(out["path"])):  # the signature's name in the contract
        # Each image, then its Grad-CAM overlay.
        assert page.images["highest-loss"] >= 2 * shown
        assert "Grad-CAM not shown" not in page.section_text("highest-loss")
    else:
        assert "Grad-CAM not shown" in page.section_text("highest-loss")
        assert page.images["highest-loss"] >= shown


def test_ood_section_shows_the_threshold_when_the_run_has_one(
    trained: tuple[Path, Path, dict],
) -> None:
    _, tmp, _ = trained
    metrics = json.loads((tmp / "report" / "metrics.json").read_text())
    _, page = _page(tmp / "report" / REPORT_FILE)
    text = page.section_text("ood")
    if "threshold" in metrics.get("ood", {}):
        assert page.images["ood"] == 1 and (tmp / "report" / "ood_scores.png").is_file()
        threshold = [row[1] for row in page.rows["ood"] if row[0] == "threshold"]
        assert float(threshold[0]) == pytest.approx(metrics["ood"]["threshold"], rel=1e-3)
    else:
        assert "Not in this report" in text and "no `ood`" in text


def test_evaluate_writes_the_report_too(trained: tuple[Path, Path, dict]) -> None:
    data, tmp, _ = trained
    result = _graft(
        "evaluate", data, "--name", "shapes", "--model-root", tmp / "models",
        "--report-dir", tmp / "evaluation", "--quiet",
    )  # fmt: skip
    out = _last_json(result)
    report = tmp / "evaluation" / REPORT_FILE
    assert out["report"]["html"] == str(report)
    _, page = _page(report)
    for heading in HEADINGS.values():
        assert heading in page.headings, heading
    _assert_self_contained(page)
    # Nothing was trained: no curves, no split to compare; the scores' reliability is drawn.
    assert "graft evaluate trains nothing" in page.section_text("curves")
    assert "no training split" in page.section_text("duplicates")
    assert page.images["calibration"] == 1 and (tmp / "evaluation" / "reliability.png").is_file()
    assert [row[0] for row in page.rows["skipped"][1:]] == ["circle/broken.jpg"]
    assert sum(int(row[1]) for row in page.rows["balance"][1:]) == 32  # broken.jpg skipped


def test_nearest_in_chunks_matches_the_whole_product(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(37, 16)), rng.normal(size=(23, 16))
    test[5] = 3 * train[11]  # a scaled copy: cosine 1
    monkeypatch.setattr(duplicates, "CHUNK_ELEMENTS", 37 * 4)  # 4 test rows per product
    found = nearest(train, test)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    whole = unit(test) @ unit(train).T
    np.testing.assert_array_equal(found.train, whole.argmax(axis=1))
    np.testing.assert_allclose(found.similarity, whole.max(axis=1), rtol=1e-5)
    pairs = found.duplicates(NEAR_DUPLICATE_SIMILARITY)
    assert [(p.test, p.train) for p in pairs] == [(5, 11)]
    below = found.closest_below(NEAR_DUPLICATE_SIMILARITY, 3)
    assert [p.test for p in below] == [int(i) for i in np.argsort(-found.similarity)[1:4]]
    assert nearest(train[:0], test).duplicates() == []


def test_markup_functions_escape_everything_but_markup() -> None:
    assert esc('<b>&"') == "&lt;b&gt;&amp;&quot;"
    cell = table(["a<"], [["<i>", Markup("<code>x</code>")]])
    assert "<th>a&lt;</th>" in cell and "&lt;i&gt;" in cell and "<code>x</code>" in cell
