"""Open an evaluation report.html in headless Chromium and save a screenshot, so a person (or
CI) can see that the self-contained page renders: timelines, histogram, tables, thumbnails.

    python scripts/screenshot_report.py OUT/report.html [--png OUT/report.png] [--height 3000]

Needs Chromium (Debian: apt-get install -y chromium). Exit 2 when it is missing or fails.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_browser() -> str | None:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def screenshot(report: Path, png: Path, width: int = 1280, height: int = 3000) -> Path:
    browser = find_browser()
    if browser is None:
        raise FileNotFoundError("no Chromium found (apt-get install -y chromium)")
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        cmd = [
            browser,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            "--disable-extensions",
            "--disable-background-networking",
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            f"--screenshot={png.resolve()}",
            report.resolve().as_uri(),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 or not png.is_file() or png.stat().st_size == 0:
        raise RuntimeError(f"chromium failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return png


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", type=Path)
    ap.add_argument("--png", type=Path)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=3000)
    args = ap.parse_args(argv)
    if not args.report.is_file():
        print(f"screenshot_report: {args.report}: no such report", file=sys.stderr)
        return 2
    png = args.png or args.report.with_suffix(".png")
    try:
        screenshot(args.report, png, args.width, args.height)
    except (FileNotFoundError, RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"screenshot_report: {exc}", file=sys.stderr)
        return 2
    print(png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
