"""The HTML report, read by a real browser: headless Chromium lays each report out
at 700 px and a small script measures what a reader would see — legend colours,
text inside its chart, horizontal overflow, colour-bar ranges against the data,
the module table's sorting.  Screenshots of every case are kept (not committed)
under test-artifacts/html/ for a reviewer to look at."""
import html
import json
import os
import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import gradience_lite as gl
from conftest import FIXTURES, PEFT_FIXTURES, ROOT, run_cli

BASES = FIXTURES / "base"
ARTIFACTS = ROOT / "test-artifacts" / "html"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ── reports to look at ──────────────────────────────────────────────────────

def llama_names(n_layers: int):
    """(module name, depth in [0, 1]) of a Llama-shaped all-linear adapter: 7 modules per layer."""
    for layer in range(n_layers):
        for index, projection in enumerate(PROJECTIONS):
            block = "self_attn" if index < 4 else "mlp"
            yield f"model.layers.{layer}.{block}.{projection}", layer / max(n_layers - 1, 1)


FLUX_DOUBLE = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
               "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
               "ff_context.net.2", "norm1.linear", "norm1_context.linear")
FLUX_SINGLE = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out", "norm.linear")


def flux_names():
    """The module paths of diffusers' FluxTransformer2DModel: 19 double-stream and 38 single-stream blocks."""
    for block in range(19):
        for module in FLUX_DOUBLE:
            yield f"transformer_blocks.{block}.{module}", block / 56
    for block in range(38):
        for module in FLUX_SINGLE:
            yield f"single_transformer_blocks.{block}.{module}", (19 + block) / 56


def synthetic_result(names, tmp_path: Path, udr: bool = True) -> gl.AuditResult:
    """An adapter over these modules (tiny 24×24 weights, r = 8) whose spectra sharpen
    with depth, audited for real; with ``udr``, base norms chosen so UDR spans
    0.02 … 5 (all three reading bands)."""
    names = list(names)
    rng = np.random.default_rng(len(names))
    tensors, norms = {}, {}
    for index, (name, depth) in enumerate(names):
        decay = (0.3 + 0.65 * depth) ** np.arange(8)
        strength = 1 + index % 7
        q_b, _ = np.linalg.qr(rng.normal(size=(24, 8)))
        q_a, _ = np.linalg.qr(rng.normal(size=(24, 8)))
        tensors[f"base_model.model.{name}.lora_A.weight"] = q_a.T
        tensors[f"base_model.model.{name}.lora_B.weight"] = q_b * decay * strength
        target_udr = 10 ** rng.uniform(np.log10(0.02), np.log10(5))
        norms[name + ".weight"] = {"sigma_max": 2.0 * strength / target_udr, "fro_norm": 10.0}
    result = gl.audit_lora_state_dict(tensors, {"r": 8, "lora_alpha": 16}, include_top_singular_values=8)
    result = replace(result, weights_path=f"synthetic-{len(names)}-modules/adapter_model.safetensors")
    if udr:
        path = tmp_path / f"norms{len(names)}.json"
        path.write_text(json.dumps({"format": "gradience_lite.base_norms/2", "norms": norms}))
        result = gl.attach_udr(result, base_norms=str(path))
    return result


def cli_report(tmp_path: Path, adapter: Path, base: Path = None):
    """The report and the audit JSON the CLI writes for one adapter in one run."""
    report = tmp_path / "report.html"
    args = ["audit", adapter, "--json", "--layers", "--html", report] + (["--base-model", base] if base else [])
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    return report.read_text(encoding="utf-8"), json.loads(proc.stdout)["layers"]


def report_case(case: str, tmp_path: Path):
    """(report HTML, per-module rows) for a named case."""
    if case == "peft_patterns_udr":
        return cli_report(tmp_path, PEFT_FIXTURES / "llama_patterns", BASES / "llama12_bf16_sharded")
    if case == "peft_14_modules":
        return cli_report(tmp_path, PEFT_FIXTURES / "llama_bf16_all_linear")
    if case == "zero_update":
        return cli_report(tmp_path, PEFT_FIXTURES / "llama_zero_init")
    if case in ("kohya_sdxl", "diffusers_unet"):
        return cli_report(tmp_path, FIXTURES / "formats" / case)
    if case == "udr_bands_at_the_ends":  # the 0.1 and 3 marks fall on the scales' very ends
        result = synthetic_result(llama_names(2), tmp_path)
        values = np.geomspace(0.1, 3.0, len(result.layers))
        result = replace(result, layers=tuple(replace(layer, udr=float(v), sdi=float(np.log10(v)))
                                              for layer, v in zip(result.layers, values)))
        return gl.render_html_report(result), [layer.to_dict() for layer in result.layers]
    names = {"synthetic_224_modules": lambda: llama_names(32), "synthetic_560_modules": lambda: llama_names(80),
             "synthetic_flux": flux_names}[case]()
    result = synthetic_result(names, tmp_path)
    return gl.render_html_report(result, command="(test) synthetic"), [layer.to_dict() for layer in result.layers]


CASES = ["peft_patterns_udr", "peft_14_modules", "kohya_sdxl", "diffusers_unet", "synthetic_224_modules",
         "synthetic_560_modules", "synthetic_flux", "udr_bands_at_the_ends",
         "zero_update"]


# ── the browser ─────────────────────────────────────────────────────────────

def chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    if os.environ.get("CI"):
        pytest.fail("no Chromium on the CI machine: .ci/run must install it")
    pytest.skip("Chromium is not installed here (`apt-get install chromium`); CI installs it")


BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                 "--hide-scrollbars"]

# Runs after the report's own script; writes what it measured into <pre id="measured">.
MEASURE = """
<script>
(function () {
  var out = {legends: [], text_outside: [], text_overlaps: [], heatmaps: [], sort: {}};
  document.querySelectorAll("svg").forEach(function (svg, k) {
    var box = svg.getBoundingClientRect();
    svg.querySelectorAll("text").forEach(function (t) {
      var b = t.getBoundingClientRect();
      if (b.left < box.left - 0.5 || b.right > box.right + 0.5 || b.top < box.top - 0.5 || b.bottom > box.bottom + 0.5) {
        out.text_outside.push({svg: svg.getAttribute("aria-label"), text: t.firstChild ? t.firstChild.textContent : "",
                               box: [b.left - box.left, b.top - box.top, b.right - box.left, b.bottom - box.top],
                               viewport: [box.width, box.height]});
      }
    });
    var boxes = Array.prototype.map.call(svg.querySelectorAll("text"), function (t) {
      return {text: t.firstChild ? t.firstChild.textContent : "", box: t.getBoundingClientRect()};
    });
    boxes.forEach(function (a, i) {
      boxes.slice(i + 1).forEach(function (b) {
        var x = Math.min(a.box.right, b.box.right) - Math.max(a.box.left, b.box.left);
        var y = Math.min(a.box.bottom, b.box.bottom) - Math.max(a.box.top, b.box.top);
        if (x > 1 && y > 1) { out.text_overlaps.push([svg.getAttribute("aria-label"), a.text, b.text]); }
      });
    });
    svg.querySelectorAll("text.legend").forEach(function (t) {
      var line = svg.querySelector(".series[data-series='" + t.getAttribute("data-series") + "']");
      out.legends.push({text: t.firstChild.textContent, fill: getComputedStyle(t).fill,
                        stroke: line ? getComputedStyle(line).stroke : null});
    });
  });
  document.querySelectorAll("svg.heatmap").forEach(function (svg) {
    var bar = svg.querySelector(".colour-bar");
    out.heatmaps.push({label: svg.getAttribute("aria-label"), cells: svg.querySelectorAll("rect.cell").length,
                       colour_bar: !!bar, ticks: bar ? Array.prototype.map.call(bar.querySelectorAll("text.cbar-tick"),
                                                                                function (t) { return t.textContent; }) : []});
  });
  out.scroll_width = document.documentElement.scrollWidth;
  out.too_wide = Array.prototype.filter.call(document.body.querySelectorAll("*"), function (e) {
    return e.getBoundingClientRect().right > document.documentElement.clientWidth + 0.5 && !e.closest(".scroll");
  }).slice(0, 5).map(function (e) { return e.tagName + "." + e.className + ": " + (e.textContent || "").slice(0, 60); });
  out.client_width = document.documentElement.clientWidth;
  var table = document.querySelector("table.sortable");
  if (table) {
    var column = function (i) { return Array.prototype.map.call(table.tBodies[0].rows, function (r) { return r.cells[i].getAttribute("data-v"); }); };
    var header = function (name) { return Array.prototype.filter.call(table.querySelectorAll("th button"), function (b) { return b.textContent === name; })[0]; };
    out.sort.before = column(3);
    header("utilization").click();
    out.sort.ascending = column(3);
    header("utilization").click();
    out.sort.descending = column(3);
    header("module").click();
    out.sort.names = column(0);
  }
  var pre = document.createElement("pre");
  pre.id = "measured";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
})();
</script>
"""


def measure(browser: str, report_html: str, folder: Path, width: int = 700) -> dict:
    page = folder / "measure.html"
    page.write_text(report_html.replace("</body>", MEASURE + "</body>"), encoding="utf-8")
    proc = subprocess.run([browser, *BROWSER_FLAGS, f"--user-data-dir={folder / 'profile'}",
                           f"--window-size={width},1000", "--dump-dom", page.as_uri()],
                          capture_output=True, text=True, timeout=180)
    found = re.search(r'<pre id="measured">(.*?)</pre>', proc.stdout, re.S)
    assert found, f"the browser did not run the measuring script: {proc.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1)))


def screenshot(browser: str, report: Path, out: Path, width: int, profile: Path) -> Path:
    subprocess.run([browser, *BROWSER_FLAGS, f"--user-data-dir={profile}",
                    f"--window-size={width},4000", f"--screenshot={out}", report.as_uri()],
                   capture_output=True, text=True, timeout=180)
    assert out.exists() and out.stat().st_size > 10000, f"no screenshot written to {out}"
    return out


def data_range(rows, key):
    values = [row[key] for row in rows if row.get(key) is not None]
    return min(values), max(values)


@pytest.mark.parametrize("case", CASES)
def test_report_reads_correctly_in_a_browser_at_700_px(case, tmp_path):
    browser = chromium()
    report_html, rows = report_case(case, tmp_path)
    measured = measure(browser, report_html, tmp_path)

    # Legends: each entry is drawn in its series' colour (not the page's text grey).
    assert measured["legends"] or case == "zero_update", "no chart legend found"
    for entry in measured["legends"]:
        assert entry["stroke"] and entry["fill"] == entry["stroke"], entry

    # Nothing is cut off or drawn over: every text element lies inside its SVG's viewport, none on another ...
    assert measured["text_outside"] == []
    assert measured["text_overlaps"] == []
    # ... and the page fits a 700-px window without a horizontal scroll bar.
    assert measured["scroll_width"] <= measured["client_width"] <= 700, measured["too_wide"]

    # Each heatmap has one cell per module and a colour bar whose labels span the data.
    expected = [("utilization heatmap", "utilization", True)]
    if any(row.get("udr") is not None for row in rows):
        expected.append(("UDR heatmap", "udr", False))
    assert [heatmap["label"] for heatmap in measured["heatmaps"]] == [label for label, _, _ in expected]
    for heatmap, (_, key, from_zero) in zip(measured["heatmaps"], expected):
        assert heatmap["cells"] == len(rows)
        assert heatmap["colour_bar"]
        ticks = [float(text) for text in heatmap["ticks"]]
        low, high = data_range(rows, key)
        assert min(ticks) <= (0.0 if from_zero else low) and max(ticks) >= high  # the labels contain the data ...
        if high > low:  # ... and are its range (one value, e.g. all zero, is widened to a readable range)
            assert min(ticks) >= (0.0 if from_zero else low * 0.99) and max(ticks) <= high * 1.01

    # The module table sorts: by utilization up, then down; by name.
    sort = measured["sort"]
    utilization = [float(v) for v in sort["ascending"]]
    assert utilization == sorted(float(row["utilization"]) for row in rows)
    assert [float(v) for v in sort["descending"]] == utilization[::-1]
    assert sort["before"] != sort["ascending"] or [float(v) for v in sort["before"]] == utilization  # it moved rows
    assert sorted(sort["names"]) == sorted(row["name"] for row in rows)

    # Keep screenshots for a reviewer (never committed: test-artifacts/ is ignored by git).
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    report = ARTIFACTS / f"{case}.html"
    report.write_text(report_html, encoding="utf-8")
    screenshot(browser, report, ARTIFACTS / f"{case}-700.png", 700, tmp_path / "profile")
    if case in ("peft_patterns_udr", "synthetic_560_modules"):
        screenshot(browser, report, ARTIFACTS / f"{case}-1280.png", 1280, tmp_path / "profile")


# ── the page without a browser ──────────────────────────────────────────────

def test_report_is_self_contained(tmp_path):
    text, _ = report_case("peft_patterns_udr", tmp_path)
    lowered = text.lower().replace('xmlns="http://www.w3.org/2000/svg"', "")
    for forbidden in ("<link", "@import", "url(", "src=", "href=", "http:", "https:"):
        assert forbidden not in lowered
    assert lowered.count("<script") == 1  # the table sorter; the page is complete without it


def test_report_header_names_file_format_version_date_and_command(tmp_path):
    report = tmp_path / "r.html"
    proc = run_cli("audit", PEFT_FIXTURES / "llama_fp16", "--html", report)
    assert proc.returncode == 0, proc.stderr
    text = report.read_text()
    assert "llama_fp16/adapter_model.safetensors" in text and "peft, adapter" in text
    assert f"gradience-lite {gl.__version__}" in text
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", text)
    assert f"gradience-lite audit {PEFT_FIXTURES / 'llama_fp16'} --html {report}" in text


def test_heatmaps_have_one_cell_per_module_and_udr_only_with_a_base(tmp_path):
    with_base, rows = report_case("peft_patterns_udr", tmp_path)
    heatmaps = with_base.split('<svg class="heatmap')[1:]
    assert [chunk.split("</svg>")[0].count('class="cell"') for chunk in heatmaps] == [len(rows), len(rows)]
    assert 'class="chart histogram"' in with_base and "Reading UDR" in with_base
    without, rows = report_case("peft_14_modules", tmp_path)
    assert without.count('<svg class="heatmap') == 1 and without.count('class="cell"') == len(rows) == 14
    assert "histogram" not in without and "Reading UDR" not in without and "--base-model" in without


def test_unet_rows_are_told_apart():
    """down_blocks and up_blocks rows used to be cut from the left into the same text."""
    names = [f"unet.{part}.attentions.{a}.transformer_blocks.0.attn1.to_q"
             for part in ("down_blocks.1", "up_blocks.1", "mid_block") for a in (0, 1)]
    rows = [gl._heatmap_coordinates(name)[0] for name in names]
    assert len(set(rows)) == len(names)
    labels = gl.distinct_labels([row[len("unet."):] for row in rows], 30)
    assert len(set(labels.values())) == len(labels)
    assert all(label[:4] == row[len("unet."):][:4] for row, label in zip(rows, labels.values()))  # down/up/mid kept
    assert gl._heatmap_coordinates("unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0") == \
        ("unet.up_blocks.1.attentions.0.transformer_blocks.0", "attn1.to_out.0")
    assert gl._heatmap_coordinates("lora_unet_down_blocks_0_resnets_1_conv1") == ("lora_unet_down_blocks_0_resnets_1", "conv1")
    # Flux: a Sequential index (ff.net.0) is part of the module, not the block
    assert gl._heatmap_coordinates("transformer_blocks.3.ff_context.net.0.proj") == \
        ("transformer_blocks.3", "ff_context.net.0.proj")
    assert gl._heatmap_coordinates("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2") == \
        ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0", "ff_net_2")


def test_hostile_module_names_render(tmp_path):
    """Digits int() refuses (a 5,000-digit index, superscripts), markup, and very long names."""
    names = ["model.layers." + "9" * 5000 + ".q_proj", "model.layers.².k_proj", "model.layers.1.<b>v_proj</b>",
             "x" * 3000, "model.layers.2." + "y" * 400]
    result = synthetic_result(list(llama_names(1))[:len(names)], tmp_path)  # renamed after the audit: this is
    result = replace(result, layers=tuple(replace(layer, name=name)     # about the report, not the reader
                                          for layer, name in zip(result.layers, names)))
    text = gl.render_html_report(result)
    assert text.count('class="cell"') == 2 * len(names) and "<b>v_proj" not in text


def test_abbreviated_labels_stay_distinct_even_when_only_the_middle_differs():
    names = ["a_very_long_prefix.0.same_long_suffix_here", "a_very_long_prefix.1.same_long_suffix_here"]
    labels = gl.distinct_labels(names, 12)
    assert len(set(labels.values())) == 2


def test_issues_are_grouped_with_the_largest_group_first():
    names = [f"m.{i}" for i in range(5)]
    issues = ["config: r is missing"] + [f"udr: m.{i}: no base weight named like it; UDR not computed" for i in range(4)] \
        + ["m.4: stored rank 8 disagrees with config r = 16"]
    groups = gl.issue_groups(issues, names)
    assert groups[0][0] == "udr: <module>: no base weight named like it; UDR not computed"
    assert [len(items) for _, items in groups] == [4, 1, 1]
    assert len(groups[0][1]) == 4 and sum(len(items) for _, items in groups) == len(issues)


def test_a_zero_adapter_is_headlined_as_zero(tmp_path):
    report = tmp_path / "zero.html"
    assert run_cli("audit", PEFT_FIXTURES / "llama_zero_init", "--html", report).returncode == 0
    text = report.read_text()
    assert "The update is zero" in text and "suggested r (p50" not in text


def test_rank_advice_is_shown_when_the_audit_carries_it(tmp_path, monkeypatch):
    # The shapes the rank advice takes: per module policy → k, per policy a summary record.
    result = synthetic_result(llama_names(2), tmp_path, udr=False)
    layers = list(result.layers)
    object.__setattr__(layers[0], "rank_suggestions", {"energy@0.90": 3, "knee": 1})
    result = replace(result, layers=tuple(layers))
    summary = result.to_summary_dict()
    summary["policy_global_suggestions"] = {"energy@0.90": {"median": 3.0, "p90": 4.0, "params_saved": 512}}
    monkeypatch.setattr(gl.AuditResult, "to_summary_dict", lambda self, *args, **kwargs: summary)
    text = gl.render_html_report(result)
    assert 'title="energy@0.90: 3, knee: 1">3</td>' in text
    assert "<h2>Rank advice</h2>" in text and "<th>params_saved</th>" in text and "<td>512</td>" in text


def test_value_scale_ticks_are_round_and_inside_the_range():
    assert gl._nice_ticks(0.0, 0.251) == [0.0, 0.05, 0.1, 0.15, 0.2, 0.25]
    assert gl.value_scale([0.0384, 0.03837, 0.6941], log=True)[:2] == (0.0383, 0.695)
    assert gl._log_ticks(0.02, 5.0) == [0.1, 1.0]
    assert gl._log_ticks(0.2, 0.9) == [0.2, 0.5]
    scale = gl.value_scale([0.02, 5.0, None], log=True)
    assert scale.fraction(0.02) == 0.0 and scale.fraction(5.0) == 1.0
