"""Render report.html to a PNG with headless Chromium, so a broken page is seen, not assumed fine.

    python -m pipeline.report.render runs/latest/report.html runs/latest/report.png     (make render)

Exit codes: 0 written; 1 Chromium ran but wrote no PNG; 2 bad input or no Chromium (the message says how
to install it). Chromium runs with a throwaway profile and every background fetch off, so rendering needs
no network and leaves nothing behind.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL_HINT = "install it with `apt-get install chromium` (Debian/Ubuntu; `make test-deps` does this)"
TIMEOUT_S = 90  # a cold start on a loaded CI runner takes ~5 s; the page itself renders in well under 1 s


class RenderError(RuntimeError):
    """Chromium is missing, or did not produce the screenshot; the message says what to do."""


def find_chromium() -> str | None:
    return next((found for name in CANDIDATES if (found := shutil.which(name))), None)


def render(html_path: Path, png_path: Path, width: int = 1400, height: int = 2000) -> Path:
    """Screenshot html_path at width x height pixels into png_path; raise RenderError on failure."""
    html_path, png_path = Path(html_path).resolve(), Path(png_path).resolve()
    if not html_path.is_file():
        raise FileNotFoundError(f"{html_path}: no such file. Write it first: `pipeline report RUN_DIR`.")
    exe = find_chromium()
    if exe is None:
        raise RenderError(f"Chromium not found (looked for {', '.join(CANDIDATES)} on PATH): {INSTALL_HINT}.")
    png_path.parent.mkdir(parents=True, exist_ok=True)
    png_path.unlink(missing_ok=True)  # a stale PNG must not pass for a new one
    with tempfile.TemporaryDirectory(prefix="render-chromium-") as profile:
        argv = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--hide-scrollbars", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
                f"--screenshot={png_path}", f"--window-size={width},{height}", html_path.as_uri()]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=TIMEOUT_S,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise RenderError(f"{exe} did not finish within {TIMEOUT_S} s rendering {html_path}.") from None
    if not png_path.is_file() or png_path.stat().st_size == 0:
        tail = (proc.stderr or proc.stdout)[-1500:].strip()
        raise RenderError(f"{exe} exited with code {proc.returncode} and wrote no {png_path.name}. "
                          f"Its output ends with:\n{tail}")
    return png_path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.report.render", description=__doc__.splitlines()[0])
    ap.add_argument("html", type=Path, help="the report.html to render")
    ap.add_argument("png", type=Path, help="where to write the screenshot")
    ap.add_argument("--width", type=int, default=1400)
    ap.add_argument("--height", type=int, default=2000)
    args = ap.parse_args(argv)
    try:
        out = render(args.html, args.png, args.width, args.height)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RenderError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if find_chromium() is None else 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
