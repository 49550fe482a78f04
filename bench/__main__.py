"""`python -m bench [--quick] [--only S,...] [--skip S,...]`: measure, then rewrite the report.

Sections (in run order): loadgen, ceiling, graft-http, graft-v2, graft-grpc, switch,
graft-nobatch, tutorial, tutorial-onnx, kserve, training, gpu (graft-http to switch share one
graft start). A section that cannot run here (KServe's venv missing in --quick, a model
without its ONNX file, gpu without a GPU) is skipped with one line saying why; the run still
passes. Each writes bench/results/<section>.json as soon as it finishes, so a partial or
failed run keeps what it measured and `--only` re-runs just what is missing.
`--resume` finishes an interrupted run; `--report-only` re-renders BENCHMARKS.md and the plots
from the JSON already there. Figures measured while other work used the CPU are labelled
"measured under contention" in the report.
"""

import argparse
import json
import math
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from bench import report, sections, servers
from bench.config import FULL, QUICK, QUICK_SKIPS, RESULTS_DIR, SECTIONS, VENV_BIN
from bench.images import REPO_ROOT, data_dir
from bench.meta import run_meta
from bench.procs import Server
from bench.sections import Context
from bench.servers import Model

# Sections measured on one graft start, in this order.
GRAFT_SERVER_SECTIONS = ("graft-http", "graft-v2", "graft-grpc", "switch")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="short runs, under 3 minutes")
    parser.add_argument("--only", type=_sections, help="comma-separated sections to run")
    parser.add_argument("--skip", type=_sections, default=[], help="sections not to run")
    parser.add_argument(
        "--model",
        default="auto",
        help="model to serve: 'auto' = plantvillage if the repository has it, "
        "else imagenet (created with `graft init-default` if missing)",
    )
    parser.add_argument("--model-root", type=Path, default=REPO_ROOT / "models")
    parser.add_argument("--duration", type=float, help="seconds measured per load run")
    parser.add_argument("--warmup", type=float, help="seconds of warm-up per load run")
    parser.add_argument(
        "--graft-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="setting for every graft server started, e.g. GRAFT_MAX_BATCH_SIZE=4 "
        "(repeatable; recorded in each result's command line): for before/after comparisons",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="skip sections that already have a successful result of the same mode "
        "(quick or full): finishes an interrupted run",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="only re-render BENCHMARKS.md and plots from bench/results/",
    )
    parser.add_argument("--no-report", action="store_true", help="measure, do not re-render")
    return parser.parse_args(argv)


def _sections(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}"
        )
    return names


def selected(args: argparse.Namespace) -> list[str]:
    chosen = args.only or [s for s in SECTIONS if not (args.quick and s in QUICK_SKIPS)]
    chosen = [s for s in SECTIONS if s in chosen and s not in args.skip]
    if args.resume:
        kept = [s for s in chosen if _already_done(s, args.quick)]
        if kept:
            print(
                f"[bench] --resume keeps {', '.join(kept)} (delete bench/results/<section>.json "
                "to measure one again)"
            )
        chosen = [s for s in chosen if s not in kept]
    return chosen


def _already_done(section: str, quick: bool) -> bool:
    """A section measured successfully, in the same mode (quick or full)."""
    path = RESULTS_DIR / f"{section}.json"
    if not path.exists():
        return False
    data = json.loads(path.read_text())
    return bool(data.get("ok")) and data["meta"].get("quick") == quick


def resolve_model(root: Path, requested: str) -> Model:
    from service.store.manifest import Manifest
    from service.store.repository import ModelRepository

    repository = ModelRepository(root)
    name = requested
    if requested == "auto":
        name = "plantvillage" if "plantvillage" in repository.models() else "imagenet"
    if name not in repository.models():
        if name != "imagenet":
            raise SystemExit(f"model {name!r} not found under {root}; train or publish it first")
        print(f"[bench] creating the ImageNet default under {root} (graft init-default)")
        graft = VENV_BIN / "graft"
        cmd = [str(graft) if graft.exists() else "graft", "init-default", "--model-root", str(root)]
        subprocess.run(cmd, check=True)
    version = repository.resolve(name)
    manifest = Manifest.read(repository.version_dir(name, version))
    return Model(
        name,
        version,
        repository.version_dir(name, version),
        manifest.backbone,
        manifest.image_size,
        len(manifest.labels),
    )


def save(section: str, data: dict[str, Any], meta: dict[str, Any], model: Model | None) -> None:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    body = {"section": section, "meta": meta, "model": _model_json(model), **data}
    path = RESULTS_DIR / f"{section}.json"
    path.write_text(json.dumps(body, indent=1, default=_json_default))


def _model_json(model: Model | None) -> dict[str, Any] | None:
    if model is None:
        return None
    return {
        "name": model.name,
        "version": model.version,
        "path": str(model.path),
        "backbone": model.backbone,
        "image_size": model.image_size,
        "classes": model.classes,
    }


def _json_default(value: object) -> object:
    return str(value)


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value


class Runner:
    """Runs the chosen sections; a section that fails is recorded and the run goes on. One
    that cannot run here (servers.Unavailable) is recorded as skipped, with its one line."""

    def __init__(self, ctx: Context, meta: dict[str, Any]) -> None:
        self.ctx, self.meta = ctx, meta
        self.failed: list[str] = []
        self.skipped: list[str] = []

    def one(self, section: str, measure: Callable[[], dict[str, Any]]) -> None:
        print(f"[bench] {section}", flush=True)
        started = time.monotonic()
        try:
            data = {"ok": True, **measure()}
        except servers.Unavailable as exc:
            print(f"[bench] {section} skipped: {exc}", flush=True)
            data = {"ok": False, "skipped": str(exc)}
            self.skipped.append(section)
        except Exception as exc:
            traceback.print_exc()
            data = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            self.failed.append(section)
        data["elapsed_s"] = time.monotonic() - started
        save(section, _nan_to_none(data), self.meta, self.ctx.model)

    def with_server(
        self,
        names: list[str],
        start: Callable[[], AbstractContextManager[Server]],
        measures: dict[str, Callable[[Server], dict[str, Any]]],
    ) -> None:
        """Several sections against one server start; if it cannot start, all of them fail."""
        done: list[str] = []
        try:
            with start() as server:
                print(f"[bench] {server.name} ready after {server.startup_s:.0f} s", flush=True)
                for name in names:
                    self.one(name, lambda name=name: measures[name](server))
                    done.append(name)
        except Exception as exc:
            for name in names:
                if name not in done:
                    self.one(name, lambda exc=exc: _raise(exc))


def _raise(exc: Exception) -> dict[str, Any]:
    raise exc


def _kserve_server(ctx: Context) -> AbstractContextManager[Server]:
    servers.ensure_kserve(build=not ctx.quick)
    return servers.kserve(ctx.model)


def plan(ctx: Context, chosen: list[str]) -> Iterator[tuple[str, Callable[[Runner], None]]]:
    model = ctx.model
    graft_names = [s for s in GRAFT_SERVER_SECTIONS if s in chosen]
    graft_measures = {
        "graft-http": lambda s: sections.graft_http(ctx, s),
        "graft-v2": lambda s: sections.graft_v2(ctx, s),
        "graft-grpc": lambda s: sections.graft_grpc(ctx, s),
        "switch": lambda s: sections.switch(ctx, s),
    }
    steps: dict[str, Callable[[Runner], None]] = {
        "loadgen": lambda r: r.with_server(
            ["loadgen"], servers.null_server, {"loadgen": lambda s: sections.calibration(ctx, s)}
        ),
        "ceiling": lambda r: r.one("ceiling", lambda: sections.ceiling(ctx)),
        "graft-http": lambda r: r.with_server(
            graft_names, lambda: servers.graft(model, "graft", ctx.graft_env), graft_measures
        ),
        "graft-nobatch": lambda r: r.with_server(
            ["graft-nobatch"],
            lambda: servers.graft(
                model, "graft-nobatch", {**ctx.graft_env, "GRAFT_MAX_BATCH_SIZE": "1"}
            ),
            {"graft-nobatch": lambda s: sections.peer(ctx, s, "graft-http", open_loop=False)},
        ),
        "tutorial": lambda r: r.with_server(
            ["tutorial"],
            lambda: servers.tutorial(model),
            {"tutorial": lambda s: sections.peer(ctx, s, "tutorial")},
        ),
        "tutorial-onnx": lambda r: r.with_server(
            ["tutorial-onnx"],
            lambda: servers.tutorial(model, "tutorial-onnx"),
            {"tutorial-onnx": lambda s: sections.peer(ctx, s, "tutorial")},
        ),
        "kserve": lambda r: r.with_server(
            ["kserve"],
            lambda: _kserve_server(ctx),
            {"kserve": lambda s: sections.peer(ctx, s, "kserve")},
        ),
        "training": lambda r: r.one("training", lambda: sections.training(ctx)),
        "gpu": lambda r: r.one("gpu", lambda: sections.gpu(ctx)),
    }
    first_graft = graft_names[0] if graft_names else None
    for name in chosen:
        if name in GRAFT_SERVER_SECTIONS:
            if name == first_graft:
                yield name, steps["graft-http"]
        else:
            yield name, steps[name]


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.report_only:
        report.render()
        return 0
    chosen = selected(args)
    profile = (QUICK if args.quick else FULL).with_durations(args.warmup, args.duration)
    meta = run_meta(args.quick)
    model = resolve_model(args.model_root.resolve(), args.model)
    print(
        f"[bench] sections: {', '.join(chosen)}; model {model.name} v{model.version} "
        f"({model.backbone}, {model.image_size} px, {model.classes} classes)",
        flush=True,
    )
    python = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable
    graft_env = dict(item.split("=", 1) for item in args.graft_env)
    ctx = Context(profile, args.quick, model, data_dir(), python, graft_env)
    if not ctx.images_dir.is_dir():
        print(f"benchmark images not found at {ctx.images_dir}: set GRAFT_BENCH_DATA")
        return 2
    runner = Runner(ctx, meta)
    started = time.monotonic()
    for _name, step in plan(ctx, chosen):
        step(runner)
    print(f"[bench] measured in {time.monotonic() - started:.0f} s", flush=True)
    if not args.no_report:
        report.render()
    if runner.skipped:
        print(f"[bench] skipped (cannot run here, see above): {', '.join(runner.skipped)}")
    if runner.failed:
        print(f"[bench] FAILED sections: {', '.join(runner.failed)} (see bench/results/)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
