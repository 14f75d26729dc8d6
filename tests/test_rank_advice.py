"""Rank advice: every policy checked against an independent implementation of its
definition (README "Rank advice") on the σ of a dense float64 SVD of ΔW."""
import json
import math
import re

import numpy as np
import pytest

from conftest import FIXTURES, fixture_deltas, peft_cases, run_cli, write_safetensors

import gradience_lite as gl

ALL_POLICIES = "energy@0.9,energy@0.5,knee,erank,oht,stable"


def marchenko_pastur_median_square():
    """μ₁, the median of the Marchenko–Pastur law at β = 1 (density √(x(4−x))/(2πx) on
    [0, 4]).  With x = 4·sin²θ its CDF is (2/π)(θ + sinθ·cosθ); bisect for 1/2."""
    low, high = 0.0, math.pi / 2
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if (2 / math.pi) * (middle + math.sin(middle) * math.cos(middle)) < 0.5 else (low, middle)
    return 4 * math.sin(low) ** 2


def oht_omega():
    lam = math.sqrt(2 * 2 + 8 / (2 + math.sqrt(16)))  # λ*(β) at β = 1: √(2(β+1) + 8β/(β+1+√(β²+14β+1)))
    return lam / math.sqrt(marchenko_pastur_median_square())


def oracle_rank(policy, sigma):
    """Each definition written out directly, loops and all."""
    sigma = [float(s) for s in sigma]
    r = len(sigma)
    if sigma[0] == 0:
        return 0
    if policy.startswith("energy@"):
        fraction = float(policy.split("@")[1])
        total = sum(s * s for s in sigma)
        running = 0.0
        for i, s in enumerate(sigma):
            running += s * s
            if running >= fraction * total:
                return i + 1
    if policy == "knee":
        if r < 3 or sigma[0] == sigma[-1]:
            return r
        best, best_index = 0.0, None
        for i in range(r):  # 0-based index i: normalised point (i/(r−1), (σᵢ−σᵣ)/(σ₁−σᵣ))
            d = (1 - i / (r - 1)) - (sigma[i] - sigma[-1]) / (sigma[0] - sigma[-1])
            if d > best + 1e-12 * (best == 0):  # round-off on a straight scree is not a knee
                best, best_index = d, i
        return best_index if best_index else r
    if policy == "erank":
        positive = [s for s in sigma if s > 1e-12]
        p = [s / sum(positive) for s in positive]
        value = math.exp(-sum(q * math.log(q) for q in p))
        return min(max(1, math.ceil(round(value, 9))), r)
    if policy == "oht":
        tau = oht_omega() * float(np.median(sigma))
        return min(max(1, sum(s > tau for s in sigma)), r)
    if policy == "stable":
        value = sum(s * s for s in sigma) / sigma[0] ** 2
        return min(max(1, math.ceil(round(value, 9))), r)
    raise AssertionError(policy)


def test_oht_constant_is_gavish_donoho_omega_at_beta_one():
    assert math.sqrt(2 * 2 + 8 / (2 + math.sqrt(16))) == pytest.approx(4 / math.sqrt(3))
    assert oht_omega() == pytest.approx(gl.OHT_OMEGA_SQUARE, abs=1e-6)
    assert oht_omega() == pytest.approx(2.858, abs=5e-4)  # Gavish & Donoho's tabulated ω(1)


@pytest.mark.parametrize("case", peft_cases(), ids=lambda case: str(case.relative_to(FIXTURES)))
def test_every_policy_matches_its_definition_on_the_dense_svd(case):
    done = run_cli("audit", case, "--json", "--layers", "--rank-policies", ALL_POLICIES)
    assert done.returncode == 0, done.stderr
    layers = {row["name"]: row for row in json.loads(done.stdout)["layers"]}
    for name, (delta, peft, a, _) in fixture_deltas(case).items():
        r = a.shape[0]
        sigma = np.linalg.svd(delta / peft["scaling"], compute_uv=False)[:r]
        want = {policy: oracle_rank(policy, sigma) for policy in ALL_POLICIES.split(",")}
        assert layers[name]["rank_suggestions"] == want, name


def test_policies_on_hand_made_spectra():
    cases = {
        (10, 9, 8, 1, 0.9, 0.8, 0.7, 0.6): {"knee": 3, "energy@0.9": 3, "stable": 3},
        (10, 1, 0.9, 0.8, 0.7): {"knee": 1, "energy@0.9": 1, "stable": 2},
        (1, 1, 1, 0, 0): {"erank": 3, "stable": 3, "knee": 3},   # exp(ln 3) is not rounded up to 4
        (5, 4.95, 4.85, 4.7): {"knee": 4},                       # concave scree: no knee, keep r
        (4, 3, 2, 1): {"knee": 4},                               # straight scree: round-off is not a knee
        (0, 0, 0): {"knee": 0, "erank": 0, "oht": 0, "energy@0.9": 0, "stable": 0},
    }
    for sigma, expected in cases.items():
        for policy, k in expected.items():
            assert gl.policy_rank(policy, sigma) == k == oracle_rank(policy, sigma), (sigma, policy)


def test_random_spectra_against_the_oracle():
    rng = np.random.default_rng(0)
    for _ in range(300):
        r = int(rng.integers(1, 40))
        sigma = np.sort(np.abs(rng.standard_cauchy(r)))[::-1]
        for policy in ALL_POLICIES.split(","):
            assert gl.policy_rank(policy, sigma) == oracle_rank(policy, sigma), (policy, sigma)


def test_global_suggestions_and_params_saved():
    case = FIXTURES / "peft" / "llama_patterns"
    summary = json.loads(run_cli("audit", case, "--json", "--layers", "--rank-policies", "knee,oht").stdout)
    assert summary["policies"] == ["knee", "oht"]
    for policy, row in summary["policy_global_suggestions"].items():
        ks = [layer["rank_suggestions"][policy] for layer in summary["layers"]]
        assert row["median"] == pytest.approx(np.percentile(ks, 50))
        assert row["p90"] == pytest.approx(np.percentile(ks, 90))
        assert row["max"] == max(ks)
        after = sum(k * (layer["a_shape"][1] + layer["b_shape"][0]) for k, layer in zip(ks, summary["layers"]))
        assert row["params_after"] == after
        assert row["params_saved"] == summary["total_lora_params"] - after


def peft_rule(patterns, name, default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def test_suggested_config_gives_each_module_its_rank_and_keeps_its_scale():
    case = FIXTURES / "peft" / "llama_patterns"
    document = json.loads(run_cli("audit", case, "--json", "--layers", "--suggest-per-layer").stdout)
    config = document["suggested_config"]
    assert config["policy"] == "energy@0.90"
    peft = json.loads((case / "expected.json").read_text())["modules"]
    for layer in document["layers"]:
        r = peft_rule(config["rank_pattern"], layer["name"], config["r"])
        alpha = peft_rule(config["alpha_pattern"], layer["name"], config["lora_alpha"])
        assert r == max(1, layer["rank_suggestions"]["energy@0.90"])
        assert alpha / r == pytest.approx(peft[layer["name"]]["scaling"], rel=1e-12)


def test_disagreement_lists_modules_whose_policies_differ_twofold():
    case = FIXTURES / "peft" / "llama_bf16_all_linear"
    document = json.loads(run_cli("audit", case, "--json", "--layers", "--suggest-per-layer",
                                  "--rank-policies", "energy@0.9,oht").stdout)
    flagged = {item["name"]: item for item in document["policy_disagreement"]}
    for layer in document["layers"]:
        ks = layer["rank_suggestions"]
        differs = max(ks.values()) >= 2 * min(ks.values()) >= 2
        assert (layer["name"] in flagged) == differs
        if differs:
            item = flagged[layer["name"]]
            assert (item["low_k"], item["high_k"]) == (min(ks.values()), max(ks.values()))
            assert ks[item["low_policy"]] == item["low_k"] and ks[item["high_policy"]] == item["high_k"]


def test_text_report_is_compact_per_type_and_per_layer(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {}
    for layer in range(12):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            block = "self_attn" if proj[0] in "qkvo" else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{proj}"
            tensors[prefix + ".lora_A.weight"] = rng.normal(size=(8, 16)).astype(np.float32)
            tensors[prefix + ".lora_B.weight"] = (rng.normal(size=(16, 8)) * 0.5 ** np.arange(8)).astype(np.float32)
    folder = tmp_path / "adapter"
    folder.mkdir()
    write_safetensors(folder / "adapter_model.safetensors", tensors)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16}))
    plain = run_cli("audit", folder).stdout
    assert "rank advice" in plain and "per layer" not in plain
    detailed = run_cli("audit", folder, "--suggest-per-layer").stdout
    per_layer = [line for line in detailed.splitlines() if line.strip().startswith("layer ")]
    assert len(per_layer) == 12  # one line per layer index, not one per module (84)
    assert all(line.count("/8") == 7 for line in per_layer)


@pytest.mark.parametrize("policies", ["energy@1.5", "bogus", ","])
def test_bad_policy_lists_are_usage_errors(policies):
    done = run_cli("audit", FIXTURES / "peft" / "llama_fp32_qv", "--rank-policies", policies)
    assert done.returncode == 2 and "--rank-policies" in done.stderr and "Traceback" not in done.stderr


def test_upstream_policy_names_are_aliases():
    assert gl.parse_rank_policies("energy_threshold knee_elbow entropy_effective optimal_hard_threshold stable_rank_ceil") \
        == ("energy@0.90", "knee", "erank", "oht", "stable")
