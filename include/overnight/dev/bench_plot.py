"""Plots users/s against N from `make bench` JSON lines: an SVG, and a PNG through headless Chromium."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def svg(points: list[tuple[int, float]], title: str) -> str:
    """Returns an SVG line chart of (users, users/s), x on a log scale."""
    import math

    w, h, m = 640, 360, 60
    xs = [math.log10(n) for n, _ in points]
    ymax = max(v for _, v in points) * 1.15
    x0, x1 = min(xs) - 0.2, max(xs) + 0.2

    def px(x: float) -> float:
        return m + (x - x0) / (x1 - x0) * (w - 2 * m)

    def py(y: float) -> float:
        return h - m - y / ymax * (h - 2 * m)

    path = " ".join(f"{'M' if i == 0 else 'L'}{px(x):.1f},{py(v):.1f}" for i, (x, (_, v)) in enumerate(zip(xs, points, strict=True)))
    dots = "".join(
        f'<circle cx="{px(x):.1f}" cy="{py(v):.1f}" r="4" fill="#1f6feb"/>'
        f'<text x="{px(x):.1f}" y="{py(v) - 10:.1f}" text-anchor="middle" font-size="12">{v:.0f}/s</text>'
        f'<text x="{px(x):.1f}" y="{h - m + 18}" text-anchor="middle" font-size="12">{n:,}</text>'
        for x, (n, v) in zip(xs, points, strict=True)
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif">'
        f'<rect width="100%" height="100%" fill="white"/>'
        f'<text x="{w / 2}" y="24" text-anchor="middle" font-size="15">{title}</text>'
        f'<line x1="{m}" y1="{h - m}" x2="{w - m}" y2="{h - m}" stroke="#555"/>'
        f'<line x1="{m}" y1="{m}" x2="{m}" y2="{h - m}" stroke="#555"/>'
        f'<text x="{w / 2}" y="{h - 15}" text-anchor="middle" font-size="12">users (log scale)</text>'
        f'<text x="18" y="{h / 2}" transform="rotate(-90 18 {h / 2})" text-anchor="middle" font-size="12">'
        f"users / s (end to end, under the scheduler)</text>"
        f'<path d="{path}" fill="none" stroke="#1f6feb" stroke-width="2"/>{dots}</svg>'
    )


def to_png(svg_text: str, out: Path) -> bool:
    """Renders the SVG to PNG with headless Chromium; returns False when no Chromium is installed."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "plot.html"
        page.write_text(f"<html><body style='margin:0'>{svg_text}</body></html>")
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp}/profile",
                        f"--screenshot={out}", "--window-size=640,360", page.as_uri()],
                       capture_output=True, timeout=60, check=False)
    return out.exists()


def main(argv: list[str] | None = None) -> int:
    """Command line: bench_plot RESULT.json... --out docs/benchmarks-users-per-s.png"""
    parser = argparse.ArgumentParser(prog="python -m overnight.dev.bench_plot")
    parser.add_argument("results", nargs="+", type=Path, help="files whose last line is a bench JSON object")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks-users-per-s.png"))
    args = parser.parse_args(argv)
    points = []
    for f in args.results:
        data = json.loads(f.read_text().strip().splitlines()[-1])
        points.append((int(data["users"]), float(data["users_per_s"])))
    text = svg(sorted(points), "make bench: users/s against N (LocalExecutor, 2 cores)")
    args.out.with_suffix(".svg").write_text(text)
    print(f"wrote {args.out.with_suffix('.svg')}" + (f" and {args.out}" if to_png(text, args.out) else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
