"""The cost of a dashboard: seconds to build it (``nsr report``) and the size of the ``dashboard/`` folder, for run or
sweep folders, on a copy (the folders given are only read; the predictor's weights are not copied: no page reads them).

    python benchmarks/dashboard.py RUN_OR_SWEEP_DIR [...] [--repeats 3] [--json out.json] [--screenshots docs/]

Seconds are wall-clock: the build in this process after the imports (``import`` is timed apart), the best of ``--repeats``
builds; and a fresh ``nsr report FOLDER`` process from start to exit (what a user waits for: Python, the imports, the
build), the best of ``--repeats`` too. ``--screenshots DIR`` also writes a full-page PNG of each index.html through headless
Chromium (``tests/test_dashboard.py`` says how to install it).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

started = time.perf_counter()
from nsr_hf.dashboard import DASHBOARD_DIR, build_dashboard  # noqa: E402 (timed: what a fresh `nsr report` imports)

IMPORT_SECONDS = time.perf_counter() - started


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def dashboards_size(folder: Path) -> int:
    """Bytes of every ``dashboard/`` folder under ``folder`` (a sweep's page and its runs' pages)."""
    return sum(folder_size(d) for d in [folder / DASHBOARD_DIR, *folder.glob(f"*/seed-*/{DASHBOARD_DIR}")] if d.is_dir())


def screenshot(page: Path, out: Path, width: int = 1400) -> Path:
    """A full-page PNG of ``page`` in headless Chromium."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", f"--window-size={width},1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.get(page.resolve().as_uri())
        driver.set_window_size(width, min(int(driver.execute_script("return document.body.scrollHeight")) + 40, 16000))
        out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(out))
    finally:
        driver.quit()
    return out


def measure(source: Path, repeats: int, screenshots: Path | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / source.name
        shutil.copytree(source, copy, ignore=shutil.ignore_patterns("*.safetensors", "checkpoints", DASHBOARD_DIR))
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            index = build_dashboard(copy)
            seconds.append(time.perf_counter() - start)
        command = []
        for _ in range(repeats):  # a fresh `nsr report`, as a user runs it
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "nsr_hf.cli", "report", str(copy)], check=True, capture_output=True)
            command.append(time.perf_counter() - start)
        result = {"folder": str(source), "kind": "sweep" if (copy / "sweep.json").is_file() else "run", "seconds": min(seconds),
                  "all_seconds": seconds, "nsr_report_seconds": min(command), "all_nsr_report_seconds": command,
                  "index_bytes": index.stat().st_size, "dashboard_bytes": dashboards_size(copy)}
        if screenshots is not None:
            result["screenshot"] = str(screenshot(index, screenshots / f"dashboard_{result['kind']}_{source.name}.png"))
    return result


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--screenshots", type=Path, default=None, help="write a PNG of each index.html into this folder")
    args = parser.parse_args(argv)
    print(f"import of nsr_hf.dashboard: {IMPORT_SECONDS:.2f} s")
    print("| folder | kind | build seconds (best) | `nsr report` seconds (fresh process, best) | index.html | all dashboard/ folders |")
    print("| --- | --- | --- | --- | --- | --- |")
    results = []
    for folder in args.folders:
        r = measure(folder, args.repeats, args.screenshots)
        results.append(r)
        print(f"| {folder} | {r['kind']} | {r['seconds']:.2f} | {r['nsr_report_seconds']:.2f} | {r['index_bytes'] / 1e6:.2f} MB | "
              f"{r['dashboard_bytes'] / 1e6:.2f} MB |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"import_seconds": IMPORT_SECONDS, "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
