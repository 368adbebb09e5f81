"""The benchmark commands run end to end through the real `kvtier` entry point and write their JSON."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import cli_in_process


def _kvtier(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("kvtier")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "kvtier.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_bench_exact_writes_json(tmp_path):
    out = _kvtier("bench", "exact", "--shapes", "qwen2.5-0.5b", "--contexts", "600", "--steps", "2", "--layers", "1",
                  "--segment", "256", "--out", str(tmp_path), "--no-plot")
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "exact.json").read_text())
    assert result["machine"]["torch"] and result["results"][0]["context"] == 600
    row = result["results"][0]
    for name in ("static", "dynamic", "kvtier"):
        assert row[name]["decode_step_ms"] > 0 and row[name]["decode_mean_ms"] > 0 and row[name]["prefill_s"] > 0
    kv = row["kvtier"]
    assert kv["decode_mean_ratio_vs_static"] == round(kv["decode_mean_ms"] / row["static"]["decode_mean_ms"], 3)
    assert kv["max_abs_logit_diff_vs_static"] < 1e-4  # segmented prefill and decode give StaticCache's logits
    assert kv["max_abs_logit_diff_vs_dynamic"] < 1e-4
    assert 1.0 <= kv["kv_bytes_ratio_vs_static"] <= 1.1  # the pool holds the tokens plus a little headroom
    for kind in ("cold", "warm"):
        assert row["reopen"][kind]["time_to_first_token_ms"] > 0
    assert row["reopen"]["cold"]["disk_mb_read"] > 0  # exact mode reads every chunk back
    assert row["reopen"]["codec_decode_mb_s"] > 0 and row["reopen"]["warm"]["read_ratio_vs_codec"] > 0
    streamed = row["reopen"]["warm_then_ask"]  # warm() read the whole session before the first step
    assert streamed["disk_mb_read"] == row["reopen"]["warm"]["disk_mb_read"] and streamed["stream_mb_s"] > 0
    assert streamed["stream_ratio_vs_codec"] > 0 and streamed["stream_ratio_vs_codec_into_memory"] > 0


def test_bench_help_is_the_benchmarks_own(tmp_path):
    out = _kvtier("bench", "exact", "--help")
    assert out.returncode == 0 and "--segment" in out.stdout and "StaticCache" in out.stdout


def test_bench_codec_writes_json(tmp_path):
    out = _kvtier("bench", "codec", "--tokens", "256", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "codec.json").read_text())
    assert result["config"]["text_source"] == "generated"
    assert {r["byte_planes"] for r in result["results"]} == {True, False}
    assert any(r["zstd_level"] is None and not r["byte_planes"] for r in result["results"])  # raw records
    assert "Nonex" not in out.stdout
    only = _kvtier("bench", "codec", "--tokens", "256", "--levels", "3", "--out", str(tmp_path))  # not the default
    assert only.returncode == 0 and "the default was not among the settings measured" in only.stdout, only.stdout


def test_unknown_command_fails_cleanly():
    out = _kvtier("bench", "nope")
    assert out.returncode == 2 and "invalid choice" in out.stderr


def test_bench_quality_runs_a_local_model_and_matches_the_full_cache_at_full_budget(tmp_path):
    """With the whole context in budget, sparse methods must reproduce the full cache (zero KL)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvtier.bench.tasks import VOCAB_SIZE

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "model")
    out = _kvtier("bench", "quality", "--model", str(tmp_path / "model"), "--context", "320", "--examples", "2",
                  "--budgets", "0.05", "1.0", "--tasks", "passkey", "niah_multikey",
                  "--methods", "kvtier", "quest", "streamingllm", "kvtier+lossy",
                  "--out", str(tmp_path), "--no-plot")
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "quality.json").read_text())
    assert result["machine"]["torch"] and result["config"]["context"] == 320
    for task in ("passkey", "niah_multikey"):
        row = result["results"][task]
        for method in ("kvtier", "quest", "streamingllm"):
            assert row[method]["1.0"]["mean_kl"] < 1e-6, (task, method)
            assert row[method]["1.0"]["accuracy"] == row["full_accuracy"]
        assert 0 <= row["kvtier+lossy"]["1.0"]["mean_kl"] < 0.05  # int8 only where attention is low
        # ... and below full budget they really decode sparsely (a reopen in exact mode would give zero KL)
        assert row["streamingllm"]["0.05"]["mean_kl"] > 1e-4, task


def test_bench_quality_names_a_model_it_cannot_load(tmp_path):
    out = _kvtier("bench", "quality", "--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path))
    assert out.returncode != 0
    assert "cannot load model" in out.stderr and "no-such-model" in out.stderr
    assert "Traceback" not in out.stderr


def test_bench_speed_writes_json_and_exact_matches_static(tmp_path):
    out = _kvtier("bench", "speed", "--contexts", "700", "--steps", "2", "--warmup", "2", "--layers", "2",
                  "--kv-heads", "2", "--head-dim", "16", "--intermediate", "64", "--out", str(tmp_path), "--no-plot")
    assert out.returncode == 0, out.stderr
    row = json.loads((tmp_path / "speed.json").read_text())["results"][0]
    assert row["context"] == 700
    for name in ("static", "static-ideal", "dynamic", "exact", "sparse", "sparse-tiered", "shared-tiered"):
        assert row[name]["decode_step_ms"] > 0
    assert row["exact"]["max_abs_logit_diff_vs_static"] < 1e-4  # fed the same tokens as StaticCache
    assert row["static-ideal"]["attended_tokens"] == 35 and row["sparse"]["ratio_vs_ideal"] > 0
    for name in ("exact", "sparse", "sparse-tiered", "shared-tiered"):  # ratios to baseline steps taken in turn
        assert row[name]["decode_ratio_vs_static"] == round(
            row[name]["decode_step_ms"] / row[name]["static_step_ms_interleaved"], 3)
    assert row["sparse"]["ratio_vs_ideal"] == round(
        row["sparse"]["decode_step_ms"] / row["sparse"]["ideal_step_ms_interleaved"], 3)
    assert row["sparse"]["mean_attended_tokens"] < 0.2 * 700  # 5% budget plus sinks and window
    assert row["sparse-tiered"]["disk_tokens"] > 0


TINY_SHAPE = dict(layers=2, heads=2, kv_heads=2, head_dim=16, intermediate=64, vocab=1024)


def test_emulated_card_budget_is_what_the_weights_leave():
    from kvtier.bench.speed import emulated_device_budget, speed_model

    model = speed_model(TINY_SHAPE, 64)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    per_token = 2 * 2 * 2 * 16 * 4  # K and V, layers, KV heads, head dim, float32
    assert emulated_device_budget(model, (weights + 1000 * per_token) / 2**30, 0.0) == 1000
    with pytest.raises(SystemExit, match="cannot hold"):
        emulated_device_budget(model, weights / 2**30, 0.5)


def test_speed_run_on_an_emulated_card_uses_its_device_budget():
    from kvtier.bench.speed import run, speed_model

    weights = sum(p.numel() * p.element_size() for p in speed_model(TINY_SHAPE, 64).parameters())
    gib = (weights + 300 * 2 * 2 * 2 * 16 * 4) / 2**30
    result = run([700], 2, 1, 0.05, 0.1, 0.1, TINY_SHAPE, gpu_gib=gib, reserve_gib=0.0, configs=["shared-tiered"])
    row = result["results"][0]
    assert result["config"]["emulated_device_budget"] == 300
    assert row["shared-tiered"]["options"]["device_budget"] == 300
    assert row["shared-tiered"]["device_peak_tokens_per_layer"] <= 300
    assert "exact" not in row and "offloaded" not in row  # offloading is measured on CUDA only


def test_speed_run_builds_no_autograd_graph(monkeypatch):
    """Every forward of `kvtier bench speed` runs as generate runs it, without autograd: a graph keeps every
    layer's activations, which on a GPU took an 8B model's 32k-token prefill out of memory."""
    from kvtier.bench import speed

    grad_seen = []
    build = speed.speed_model

    def hooked(*args, **kwargs):
        model = build(*args, **kwargs)
        model.register_forward_pre_hook(lambda module, inputs: grad_seen.append(torch.is_grad_enabled()))
        return model

    monkeypatch.setattr(speed, "speed_model", hooked)
    speed.run([300], 2, 1, 0.1, 0.5, 0.5, TINY_SHAPE, configs=["shared-tiered"])
    assert grad_seen and not any(grad_seen)


def test_bench_kernels_runs_on_cpu_with_tiny_shapes(tmp_path):
    """`kvtier bench kernels --device cpu` in this process: the references are timed; the Triton kernels run
    only under TRITON_INTERPRET=1 (test_kernels.py checks them there)."""
    from kvtier.cli import main

    assert main(["bench", "kernels", "--device", "cpu", "--contexts", "256", "--heads", "4", "--kv-heads", "2",
                 "--head-dim", "16", "--chunk", "16", "--budget", "0.25", "--reps", "2", "--warmup", "1",
                 "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "kernels.json").read_text())
    assert result["machine"]["torch"] and "triton" in result["machine"] and "cuda" in result["machine"]
    rows = {r["kernel"]: r for r in result["results"]}
    assert set(rows) == {"chunk_scores", "sparse_decode_attention", "block_decode_attention"}
    assert rows["chunk_scores"]["shape"]["chunks"] == 16
    assert rows["sparse_decode_attention"]["shape"]["selected_slots"] == 64
    assert rows["block_decode_attention"]["shape"]["blocks"] == 5  # history + 4 workers' steps
    assert all(r["reference_ms"] > 0 for r in rows.values()) and result["all_match"]
    if result["config"]["triton_mode"] == "unavailable":
        assert not any("kernel_ms" in r for r in rows.values())
    else:
        assert all(r["match"] and r["kernel_ms"] > 0 for r in rows.values())


def test_bench_hogwild_writes_json_and_its_methods_agree(tmp_path):
    """`kvtier bench hogwild` on a tiny grouped-query Llama: each method timed at each worker count, the prompt's KV
    held once by Hogwild and once per worker by the independent runs, and the same logits where the views are the
    same (the re-rotation baseline rebuilds every Hogwild view; one worker's view is the independent sequence)."""
    from kvtier.cli import main

    assert main(["bench", "hogwild", "--workers", "1", "3", "--prompt", "40", "--steps", "3", "--warmup", "1",
                 "--shape", "qwen2.5-0.5b", "--layers", "2", "--kv-heads", "2", "--head-dim", "16",
                 "--intermediate", "64", "--out", str(tmp_path), "--no-plot"]) == 0
    result = json.loads((tmp_path / "hogwild.json").read_text())
    assert result["machine"]["torch"] and result["config"]["prompt_tokens"] == 40
    rows = {r["workers"]: r for r in result["results"]}
    assert set(rows) == {1, 3}
    for n, row in rows.items():
        assert all(row[name]["step_ms"] > 0
                   for name in ("independent", "independent_kvtier_linears", "hogwild", "rerotate"))
        assert row["view_tokens"] == 40 + n * 4  # the prompt and every worker's 1 + 3 tokens
        assert row["independent"]["prompt_copies"] == n and row["hogwild"]["prompt_copies"] == 1
        assert row["independent"]["prompt_kv_bytes"] == n * row["hogwild"]["prompt_kv_bytes"]
        assert row["hogwild"]["prompt_kv_bytes"] <= row["hogwild"]["kv_bytes_history"]
        assert row["independent"]["kv_bytes"] >= row["independent"]["prompt_kv_bytes"]
        assert row["max_abs_logit_diff_hogwild_vs_rerotate"] < 1e-4
        assert row["max_abs_logit_diff_independent_vs_kvtier_linears"] < 1e-4
    assert rows[1]["max_abs_logit_diff_hogwild_vs_independent"] < 1e-4
    assert rows[1]["hogwild"]["ratio_vs_one_worker"] == 1.0
    targets = result["targets"]
    assert targets["prompt_kv_held_once"]["met"] is True
    assert targets["hogwild_step_vs_one_worker"]["met"] is None  # N = 4 was not run
    for name in ("linear", "linear_kvtier", "attention", "attention_kvtier"):  # each operation timed alone at every worker count
        costs = result["row_costs"][name]
        assert set(costs) == {"1", "3"} and all(c["ms"] > 0 for c in costs.values())
        assert costs["1"]["x_one_row"] == 1.0


def test_speed_run_skips_contexts_past_its_time_limit():
    """The first context always runs; a later one that the previous one's time says would not fit is skipped,
    and the partial result handed out after each context says it is not complete."""
    from kvtier.bench.speed import run

    partial = []
    result = run([600, 700], 1, 1, 0.05, 0.1, 0.1, TINY_SHAPE, configs=["shared-tiered"], time_limit_s=1e-3,
                 on_context=partial.append)
    assert [r["context"] for r in result["results"]] == [600]
    assert result["skipped_contexts"] == [700] and result["complete"] is False
    assert [p["complete"] for p in partial] == [False] and partial[0]["results"][0]["context"] == 600


@pytest.mark.parametrize("args", [["exact", "--contexts", "0"], ["exact", "--steps", "-1"], ["speed", "--contexts", "x"],
                                  ["hogwild", "--workers", "0"], ["hogwild", "--warmup", "-1"]])
def test_bench_refuses_bad_counts_in_one_line(args):
    out = cli_in_process(["bench", *args])
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert [line for line in out.stderr.splitlines() if "error:" in line][0].startswith(f"kvtier bench {args[0]}: error:")


def test_bench_tim_writes_json_and_pruning_keeps_fewer_tokens(tmp_path, capsys):
    """`kvtier bench tim` on a tiny Llama and a short scripted thread: every method writes the script's text, the
    pruning methods hold fewer KV tokens than the unpruned run (whose positions pass the 4k window only on a
    long thread, so that target is unmet here), and shift and re-encode keep the same tokens."""
    from kvtier.cli import main

    assert main(["bench", "tim", "--tokens", "600", "--leaves", "2", "--layers", "1", "--heads", "2",
                 "--kv-heads", "1", "--head-dim", "16", "--intermediate", "32", "--edge-steps", "20",
                 "--out", str(tmp_path), "--no-plot"]) == 0
    result = json.loads((tmp_path / "tim.json").read_text())
    assert result["machine"]["torch"] and result["config"]["max_position_embeddings"] == 4096
    assert result["config"]["script_tokens"] >= 600 and result["config"]["parts"] >= 3
    rows = result["results"]
    assert set(rows) == {"shift", "reencode", "none"}
    for name, row in rows.items():
        assert row["stopped"] == "answer" and row["text_matches_script"], name
        assert row["generated_tokens"] == result["config"]["script_tokens"]
        assert row["tool_calls"] == result["config"]["parts"] * 2 and row["injected_tokens"] > 0
        assert row["step_ms_start"] > 0 and row["step_ms_end"] > 0
        assert row["max_position"] == row["peak_kv_tokens"] - 1
        assert row["device_kv_bytes_at_peak"] > 0
    shift, reencode, none = rows["shift"], rows["reencode"], rows["none"]
    assert shift["peak_kv_tokens"] < none["peak_kv_tokens"] and shift["final_kv_tokens"] < none["final_kv_tokens"]
    assert shift["device_kv_bytes_at_peak"] < none["device_kv_bytes_at_peak"]
    assert shift["share_pruned"] > 0 and shift["removals"] > 0 and none["share_pruned"] == 0
    assert shift["prune_s_total"] > 0 and reencode["reencoded_tokens"] > 0 and shift["reencoded_tokens"] == 0
    assert reencode["kept_ids_match_shift"] and reencode["peak_kv_tokens"] == shift["peak_kv_tokens"]
    assert 0 < shift["first_removal_at"] == reencode["first_removal_at"] < shift["generated_tokens"]
    assert shift["step_ms_after_first_removal"] > 0 and none["step_ms_after_first_removal"] is None
    assert result["ratios"]["peak_kv_shift_vs_none"] < 1
    targets = result["targets"]
    assert targets["texts_match_script"]["met"] is True
    assert targets["finishes_past_the_window"]["met"] is False  # 600 tokens stay far below 4096
    assert set(targets) == {"finishes_past_the_window", "peak_kv_shift_vs_none", "shift_step_end_vs_start",
                            "texts_match_script"}
    points = -(-result["config"]["script_tokens"] // 250)  # one per 250 generated tokens
    assert {m: len(s["kv_tokens"]) for m, s in result["series"].items()} == {m: points for m in rows}
    for args in (["--tokens", "0"], ["--prune-buffer", "-1"], ["--heads", "3", "--kv-heads", "2"]):
        with pytest.raises(SystemExit) as exit_:
            main(["bench", "tim", *args])
        assert exit_.value.code == 2, args
        assert capsys.readouterr().err.splitlines()[-1].startswith("kvtier bench tim: error:")


def test_bench_span_writes_json_and_reads_no_moved_record(tmp_path):
    """`kvtier bench span` on a tiny shape: the removal reads only the chunks an edge cut, the alternatives are
    timed, and the JSON holds the ratios."""
    from kvtier.cli import main

    assert main(["bench", "span", "--context", "1200", "--at", "64", "--span", "64", "--steps", "2", "--warmup", "1",
                 "--layers", "2", "--segment", "256", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "span.json").read_text())["result"]
    assert result["turn_on_read"]["disk_bytes_read"] == result["disk_bytes_of_cut_chunks"]
    assert result["disk_chunks_moved"] > 0 and result["rewrite"]["disk_bytes_read_and_written"] > 0
    assert result["reencode"]["tokens_encoded"] > 1000
    assert set(result["ratios"]) == {"rewrite_vs_turn_on_read", "reencode_vs_turn_on_read", "step_after_vs_before"}


@pytest.mark.redis
def test_bench_remote_writes_json_and_leaves_nothing_on_the_server(tmp_path, redis_base, redis_url):
    """`kvtier bench remote` on a tiny shape: the second machine's answers equal the local session's, the
    second answer reads nothing from the server, and the benchmark's keys are gone afterwards."""
    from redis_server import client_for

    out = _kvtier("bench", "remote", "--url", redis_url, "--layers", "1", "--kv-heads", "2", "--head-dim", "16",
                  "--intermediate", "64", "--tokens", "600", "--segment", "256", "--question", "4", "--steps", "3",
                  "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "remote.json").read_text())
    r = result["result"]
    assert result["config"]["tokens"] == 600 and r["publish"]["records"] > 0 and r["keys_removed"] > 0
    assert r["reprefill"]["ttft_ms"] > 0 and r["headline"] == "sparse"
    assert r["sparse"]["options"]["host_budget"] == 0 and r["sparse"]["options"]["device_budget"] < 600
    for mode in ("exact", "sparse"):
        row = r[mode]
        assert row["same_tokens_first_answer"] and row["same_tokens_second_answer"], mode
        assert row["max_abs_logit_diff"] == 0.0, mode
        assert 0 < row["remote"]["server_bytes_by_first_token"] <= r["publish"]["bytes"]
        assert row["remote"]["server_bytes_second_answer"] == 0  # every chunk it selects is cached locally by then
        assert row["remote"]["ttft_ms"] > 0 and row["local"]["steady_step_ms"] > 0
    assert set(r["targets"]) == {"ttft_exact", "steady_step_exact", "ttft_sparse", "steady_step_sparse"}
    prefix = redis_url.split("prefix=")[1]
    assert not list(client_for(redis_base).scan_iter(match=f"{prefix}-bench-*"))


def test_bench_remote_without_a_server_is_one_line_without_the_password(tmp_path):
    pytest.importorskip("redis")
    out = _kvtier("bench", "remote", "--url", "redis://bench:s3cret-pw@127.0.0.1:1/0", "--tokens", "64",
                  "--out", str(tmp_path))
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "cannot reach the server" in out.stderr and "s3cret-pw" not in out.stderr + out.stdout
    assert len(out.stderr.strip().splitlines()) == 1 and not (tmp_path / "remote.json").exists()


def test_gpu_profile_script_runs_on_cpu_smoke(tmp_path):
    """scripts/gpu_profile.py (the GPU check's profile step) on the CPU with a tiny shape: every part reports,
    and its parity part finds kvtier's logits equal to DynamicCache's."""
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, str(root / "scripts" / "gpu_profile.py"), "--cpu-smoke", "--context", "512",
                    "--segment", "128", "--steps", "3", "--out", str(tmp_path)], check=True, cwd=tmp_path,
                   capture_output=True, text=True)
    result = json.loads((tmp_path / "profile-llama3-8b-cuda.json").read_text())
    for part in ("prefill", "decode", "hogwild", "memory", "parity"):
        assert "error" not in result[part], result[part]
    assert result["decode"]["step_ms"]["kvtier"] > 0 and result["hogwild"]["step_ms"] > 0
    assert result["prefill"]["top_ops_by_cpu"] and result["decode"]["python_top_10_steps"]
    for dtype in ("bfloat16", "float32"):
        assert result["parity"][dtype]["max_abs_logit_diff_vs_dynamic"] <= 1e-5
