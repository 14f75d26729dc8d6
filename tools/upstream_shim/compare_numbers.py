"""Numbers, not names: upstream gradience 0.11.0 itself vs gradience_lite on the PEFT fixtures.

    PYTHONPATH=/path/to/gradience-0.11.0 /work/venv-tools/bin/python tools/upstream_shim/compare_numbers.py

Runs upstream's real ``audit_lora_peft_dir`` (torch) and gradience_lite's on
every root PEFT adapter in tests/fixtures/peft, with the same base norms
(computed by base_norms from tests/fixtures/base/llama_fp32, written in the
flat cache format upstream reads) for the Llama fixtures, and prints, for each
key both tools report, the largest relative difference.  gradience_lite's
``percentile="nearest"`` is compared with upstream's UDR / SDI statistics.
"""
import contextlib
import io
import json
import math
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# This folder holds the rename shim, also called `gradience`: take it off the path
# so the import below is upstream's real package (from PYTHONPATH).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

import base_norms  # noqa: E402
import gradience_lite as gl  # noqa: E402
from gradience.vnext.audit import audit_lora_peft_dir as upstream_audit  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
ROW_KEYS = ("r", "params", "stable_rank", "effective_rank", "utilization", "sigma_max", "frob_sq", "energy_rank_90",
            "energy_rank_95", "energy_rank_99", "top_singular_values", "scale", "delta_sigma_max", "delta_fro_norm",
            "base_sigma_max", "base_fro_norm", "udr", "udr_f", "sdi")
SUMMARY_KEYS = ("total_lora_params", "n_layers", "stable_rank_mean", "stable_rank_median", "stable_rank_weighted_mean",
                "effective_rank_mean", "utilization_mean", "energy_rank_90_p50", "energy_rank_90_p90",
                "suggested_r_global_median", "suggested_r_global_90", "n_layers_with_udr", "udr_mean", "udr_median",
                "udr_p90", "udr_max", "sdi_mean", "sdi_median", "sdi_p90", "fraction_udr_gt_0_1",
                "fraction_udr_gt_0_3")


def relative(a, b):
    if isinstance(a, list):
        return max((relative(x, y) for x, y in zip(a, b)), default=0.0) if len(a) == len(b) else math.inf
    if a is None or b is None:
        return 0.0 if a is b else math.inf
    return abs(a - b) / max(abs(a), abs(b), 1e-300)


def upstream_cache(case, folder):
    """Base norms for the Llama fixtures in upstream's flat cache format ({name: {sigma_max, fro_norm}})."""
    if "llama" not in case.name:
        return None
    computed = base_norms.compute_base_norms(str(FIXTURES / "base" / "llama_fp32"))["norms"]
    flat = {name[:-len(".weight")].replace("model.", "", 1): {"sigma_max": v["sigma_max"], "fro_norm": v["fro_norm"]}
            for name, v in computed.items()}
    path = Path(folder) / f"{case.name}.json"
    path.write_text(json.dumps(flat))
    return str(path)


def track(worst, key, difference, where):
    if difference > worst[key][0]:
        worst[key] = (difference, where)


def main():
    worst = defaultdict(lambda: (0.0, ""))
    not_comparable = []
    with tempfile.TemporaryDirectory() as folder:
        for case in sorted(p.parent for p in (FIXTURES / "peft").glob("*/adapter_model.safetensors")):
            cache = upstream_cache(case, folder)
            with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
                theirs = upstream_audit(str(case), include_top_singular_values=8, base_norms_cache=cache,
                                        compute_udr=cache is not None)
            ours = gl.audit_lora_peft_dir(case, include_top_singular_values=8, base_norms_cache=cache)
            their_rows = {row.name.replace(gl.PEFT_WRAPPER, "", 1): row.to_dict() for row in theirs.layers}
            reasons = [f"{name}: not audited upstream" for name in (l.name for l in ours.layers) if name not in their_rows]
            for layer in ours.layers:
                row, ours_row = their_rows.get(layer.name), layer.to_dict()
                if row is None:
                    continue
                if row["scale"] != ours_row["scale"]:
                    reasons.append(f"{layer.name}: scale upstream {row['scale']} ours {ours_row['scale']}")
                for key in ROW_KEYS:
                    if key in row:
                        track(worst, key, relative(row[key], ours_row[key]),
                              f"{case.name}: {layer.name} upstream {row[key]} ours {ours_row[key]}")
            if reasons:  # summaries over different module sets or scales cannot agree
                not_comparable.append(f"{case.name}: {reasons[0]}" + (f" (+{len(reasons) - 1} more)" if len(reasons) > 1 else ""))
                continue
            their_summary, our_summary = theirs.to_summary_dict(), ours.to_summary_dict(percentile="nearest")
            for key in SUMMARY_KEYS:
                if key in their_summary:
                    track(worst, f"summary.{key}", relative(their_summary[key], our_summary[key]),
                          f"{case.name}: upstream {their_summary[key]} ours {our_summary[key]}")
    print("per-module keys over modules both audit; summary keys (ours with percentile='nearest') over")
    print("adapters where both audit the same modules with the same scale")
    print(f"{'key':<38} {'max relative difference':>24}  where (when > 1e-12)")
    for key, (difference, where) in sorted(worst.items()):
        print(f"{key:<38} {difference:>24.3g}  {where if difference > 1e-12 else ''}")
    print("adapters whose summaries are not comparable:")
    for line in not_comparable:
        print(f"  {line}")


if __name__ == "__main__":
    main()
