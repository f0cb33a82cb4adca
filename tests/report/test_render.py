"""report.html as a person sees it: rendered headless by Chromium to a PNG that must not be blank."""
from __future__ import annotations

import pytest
from PIL import Image, ImageStat

from pipeline.report import render

needs_chromium = pytest.mark.skipif(render.find_chromium() is None,
                                    reason="Chromium not installed: apt-get install chromium (make test-deps)")
MIN_STD = 20.0  # grey-level standard deviation; a blank page is 0, the report is about 60
MIN_INK = 0.02  # share of pixels that are not background


def ink(png) -> tuple[float, float]:
    """(standard deviation of grey levels, share of pixels darker than near-white)."""
    with Image.open(png) as im:
        grey = im.convert("L")
        std = ImageStat.Stat(grey).stddev[0]
        hist = grey.histogram()
    return std, sum(hist[:240]) / sum(hist)


@needs_chromium
def test_report_renders_to_a_png_that_is_not_blank(real_run, tmp_path):
    png = render.render(real_run / "report.html", tmp_path / "report.png", 1400, 2000)
    with Image.open(png) as im:
        assert im.size == (1400, 2000)
    std, share = ink(png)
    assert std > MIN_STD and share > MIN_INK, f"the page looks blank: std {std:.1f}, ink {share:.3f}"


@needs_chromium
def test_a_blank_page_fails_the_same_check(tmp_path):
    page = tmp_path / "blank.html"
    page.write_text("<!doctype html><title>blank</title><body></body>")
    std, share = ink(render.render(page, tmp_path / "blank.png", 400, 300))
    assert std < MIN_STD and share < MIN_INK


def test_missing_chromium_says_how_to_install(tmp_path, monkeypatch, capsys):
    page = tmp_path / "r.html"
    page.write_text("<p>x</p>")
    monkeypatch.setattr(render.shutil, "which", lambda _name: None)
    assert render.main([str(page), str(tmp_path / "r.png")]) == 2
    assert "apt-get install chromium" in capsys.readouterr().err
    assert not (tmp_path / "r.png").exists()


def test_missing_html_is_a_clear_error(tmp_path, capsys):
    assert render.main([str(tmp_path / "none.html"), str(tmp_path / "o.png")]) == 2
    assert "no such file" in capsys.readouterr().err


@needs_chromium
def test_a_two_head_report_renders_to_a_png_that_is_not_blank(tmp_path):
    """Per-head columns and budgets, and the plots with a per-head budget, in a real browser."""
    from pipeline.report import html
    from tests.report.test_gate import two_head_report
    page = tmp_path / "report.html"
    page.write_text(html.render(two_head_report(min_accuracy={"digit": 0.9, "parity": 0.99},
                                                max_accuracy_drop={"digit": 0.03})))
    std, share = ink(render.render(page, tmp_path / "report.png", 1400, 2000))
    assert std > MIN_STD and share > MIN_INK, f"the page looks blank: std {std:.1f}, ink {share:.3f}"
