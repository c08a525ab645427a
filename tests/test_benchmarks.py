"""The benchmarks run end to end on tiny sizes (their real sizes are for ``make bench``)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from hf_trak.testing.processes import subprocess_env

pytestmark = pytest.mark.slow
BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def run(script, *args, cwd):
    done = subprocess.run([sys.executable, os.path.join(BENCHMARKS, script), *args], cwd=cwd, env=subprocess_env(),
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]  # a script's own failures go to stdout
    return done.stdout


def test_query_benchmark_prints_its_ratios(tmp_path):
    out = run("query.py", "--num-examples", "3000", "--proj-dim", "64", "--targets", "20", "--repeats", "1",
              "--shard-size", "512", "--ivf", "16", "--nprobe", "1", "16", "--recall-targets", "20",
              cwd=tmp_path)  # fmt: skip
    assert "x one read" in out and "x the GEMM floor" in out and "before version 3" in out
    assert "faiss exact index" in out and "nprobe=16: " in out  # nprobe = every list: exact
    assert "nprobe=16: " in out.splitlines()[-1] and out.splitlines()[-1].endswith("recall@10 1.000 over 20 targets")


def test_the_lds_suite_scores_the_shipped_ground_truth_shapes(tmp_path):
    """The ground truth files hold 32 halves × 2 seeds for each task (64 retrained models), and lds.py reads them,
    running each randomized method once per seed (``--seeds``) and the deterministic ones once."""
    sys.path.insert(0, BENCHMARKS)
    try:
        from lds import ground_truth, noise_ceiling
        from lds_suite import CHOOSE, CONFIRM, TASKS
    finally:
        sys.path.remove(BENCHMARKS)
    assert not set(CHOOSE) & set(CONFIRM) and set(CHOOSE) | set(CONFIRM) == set(TASKS)  # fixed before tuning
    for name, make in TASKS.items():
        masks, outputs = ground_truth(name)
        task = make()
        assert masks.shape == (32, len(task.train)) and (masks.sum(1) == len(task.train) // 2).all()
        assert outputs.shape == (2, 32, len(task.targets)) and np.isfinite(outputs).all()
        assert 0 < noise_ceiling(outputs) <= 1.0
    fake = tmp_path / "gt"
    fake.mkdir()
    masks = np.random.default_rng(0).random((6, 600)) < 0.5
    outputs = np.random.default_rng(1).random((2, 6, 100)).astype(np.float32)
    np.savez(fake / "image.npz", masks=np.packbits(masks, axis=1), num_train=600, outputs=outputs)
    out = run("lds.py", "--tasks", "image", "--methods", "hf_trak (default)", "hf_trak, random factors, no shrinkage",
              "trak", "cosine", "--models", "1", "--proj-dim", "32", "--seeds", "2", "--data", str(fake),
              cwd=tmp_path)  # fmt: skip
    rows = {line.split(" | ")[1]: line for line in out.splitlines() if line.startswith("| image | ")}
    assert set(rows) == {"hf_trak (default)", "hf_trak, random factors, no shrinkage", "trak", "cosine"}
    assert all(rows[method].split(" | ")[4].endswith("(2)") for method in ("hf_trak (default)", "trak"))
    assert rows["cosine"].split(" | ")[4].endswith("(1)")  # deterministic: one run
    assert "hf_trak (default)             K=1 seed 1: LDS" in out
    other = run("lds.py", "--tasks", "image", "--methods", "cosine", "--models", "1", "--model-draw", "1", "--data",
                str(fake), cwd=tmp_path)  # fmt: skip
    assert "1 models (draw 1) trained" in other  # seed 100: another model, so another cosine's LDS
    drawn = [line for line in other.splitlines() if line.startswith("| image | cosine")]
    assert len(drawn) == 1 and drawn[0].split(" | ")[3] != rows["cosine"].split(" | ")[3]


def test_a_blend_with_cosine_is_the_default_at_weight_0_and_cosine_at_a_large_weight(monkeypatch):
    """``hf_trak + cosine ×w`` sums the two methods' scores, each in units of its spread over the train rows for
    each target: LDS (ranks of subset sums) is the default's at w = 0 and cosine's as w grows."""
    sys.path.insert(0, BENCHMARKS)
    try:
        import lds
    finally:
        sys.path.remove(BENCHMARKS)
    from hf_trak.evaluate import lds as lds_of

    rng = np.random.default_rng(0)
    default, cosine = rng.normal(size=(40, 3)) * [1.0, 50.0, 1e-3], rng.normal(size=(40, 3))
    cosine[:, 2] = 0.0  # a target without a same-label row: its column stays 0
    monkeypatch.setattr(lds, "trak_scores", lambda task, models, k, estimator, seed: default)
    monkeypatch.setattr(lds, "cosine_scores", lambda task, models: cosine)
    unit = lds.per_target_unit(cosine)
    np.testing.assert_allclose(unit[:, :2].std(0), 1.0)
    assert (unit[:, 2] == 0).all()
    masks, outputs = rng.random((16, 40)) < 0.5, rng.normal(size=(16, 3))
    at = {weight: lds_of(lds.with_cosine(weight)(None, None, 32, 0), masks, outputs).per_target for weight in (0, 1e9)}
    np.testing.assert_allclose(at[0], lds_of(default, masks, outputs).per_target)
    np.testing.assert_allclose(at[1e9][:2], lds_of(cosine, masks, outputs).per_target[:2])


def test_the_lds_suite_attributes_its_clip_task(tmp_path):
    """The CLIP task trains contrastively and is scored by hf_trak and by the cosine of its pairs' embeddings."""
    fake = tmp_path / "gt"
    fake.mkdir()
    masks = np.random.default_rng(0).random((6, 320)) < 0.5
    outputs = np.random.default_rng(1).random((2, 6, 64)).astype(np.float32)
    np.savez(fake / "clip.npz", masks=np.packbits(masks, axis=1), num_train=320, outputs=outputs)
    out = run("lds.py", "--tasks", "clip", "--methods", "hf_trak (default)", "cosine", "--models", "1", "--proj-dim",
              "32", "--data", str(fake), cwd=tmp_path)  # fmt: skip
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| clip | ")]
    assert [row[1] for row in rows] == ["hf_trak (default)", "cosine"]
    assert all(np.isfinite(float(row[3])) and float(row[3]) != 0 for row in rows)


def test_the_estimator_cost_benchmark_compares_the_two_estimators_in_one_run(tmp_path):
    out = run("estimator_cost.py", "--num-examples", "8", "--proj-dim", "512", "--repeats", "1", cwd=tmp_path)
    lines = out.splitlines()
    assert any("gpt2" in line and "hf_trak" in line and "per_module kernel from tokens" in line for line in lines)
    assert any("bert" in line and "trak    : k=512, factored projector, global kernel" in line for line in lines)
    assert sum("hf_trak / trak: time" in line for line in lines) == 2


def test_the_exit_race_benchmark_launches_both_ways(tmp_path):
    """One launch of each, counted in the table (how often one aborts is a measurement for ``make bench``)."""
    out = run("exit_race.py", "--launches", "1", cwd=tmp_path)
    assert "after 1 launches of each: gather_object " in out
    assert "| gather_object | 1 | " in out and "| hf_trak | 1 | " in out


def test_explore_benchmark_times_a_query_on_a_demo_like_store(tmp_path):
    pytest.importorskip("faiss")
    from transformers import ViTImageProcessor

    import hf_trak
    from hf_trak.demo.digits import load_digits
    from hf_trak.demo.pipeline import NUM_TRAIN
    from hf_trak.testing.models import tiny_vit

    model, processor = tiny_vit(), ViTImageProcessor(do_resize=False, image_mean=[0.5], image_std=[0.5])
    model.save_pretrained(str(tmp_path / "model"))
    processor.save_pretrained(str(tmp_path / "model"))
    hf_trak.attribute(str(tmp_path / "model"), load_digits(0, NUM_TRAIN), load_digits(0, 1), processor=processor,
                      save_dir=str(tmp_path / "demo" / "trak"), proj_dim=32)  # fmt: skip
    out = run("explore.py", "--demo-dir", str(tmp_path / "demo"), "--repeats", "1", cwd=tmp_path)
    assert "no index (reads the store): n=600, 1 checkpoints, k=32" in out and "exact faiss index" in out
    assert "IVF8,Flat, nprobe=4: recall@10" in out


def test_the_score_snapshot_finds_identical_scores_and_a_changed_one(tmp_path):
    """Two runs of one checkout score identically; a score changed in the saved file is reported."""
    args = ("--tasks", "lm", "--settings", "default", "trak", "--epochs", "1", "--threads", "1")
    run("score_snapshot.py", "--out", "a.npz", *args, cwd=tmp_path)
    assert run("score_snapshot.py", "--out", "b.npz", "--compare", "a.npz", *args, cwd=tmp_path).endswith(
        "4 arrays, 0 differ\n"
    )
    sys.path.insert(0, BENCHMARKS)
    try:
        from score_snapshot import differences
    finally:
        sys.path.remove(BENCHMARKS)
    saved = dict(np.load(tmp_path / "a.npz"))
    changed = {**saved, "lm/trak": saved["lm/trak"] + np.float32(1e-6)}
    assert differences(saved, changed) == ["differs: lm/trak"]
    assert differences(saved, {k: v for k, v in saved.items() if k != "lm/default"}) == ["only in one: lm/default"]


def test_the_explorer_answers_concurrent_clients_each_its_own_target(tmp_path):
    pytest.importorskip("gradio_client")
    out = run("explore_load.py", "--tiny", "--clients", "3", "--queries", "2", cwd=tmp_path)
    assert "3 clients × 2 queries: 6 answered, 0 failed" in out and "latency p50" in out


def test_the_mislabeled_benchmark_prints_auc_and_top_share_for_each_method(tmp_path):
    out = run("mislabeled.py", "--tasks", "image", "--models", "2", "--epochs-scale", "0.1", "--train-rows", "60",
              "--methods", "loss", "hf_trak self-influence", cwd=tmp_path)  # fmt: skip
    assert "image: n=60, 6 flipped, 2 epochs, 2 models" in out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| image | ")]
    assert [(row[1], row[2]) for row in rows] == [("loss", "1"), ("loss", "2"), ("hf_trak self-influence", "1"),
                                                  ("hf_trak self-influence", "2")]  # fmt: skip
    assert all(0 <= float(row[3]) <= 1 and abs(float(row[4]) * 6 - round(float(row[4]) * 6)) < 0.04 for row in rows)


def test_the_checks_benchmark_runs_both_checks(tmp_path):
    out = run("checks.py", "--num-subsets", "2", "--targets", "0", "1", "--k", "3", "--seeds", "1", "--num-train",
              "40", "--num-targets", "5", "--max-steps", "2", cwd=tmp_path)  # fmt: skip
    assert "over 2 models trained on 50% of the train split; random scores:" in out
    assert "target 1: f " in out and "of the 2 targets" in out


def test_the_llm_cost_benchmark_prints_each_measurement_against_the_training_step(tmp_path):
    out = run("llm_cost.py", "--models", "bert-small", "--lengths", "16", "--examples", "4", "--batch-size", "2",
              "--variants", "training step", "featurize (default)", "--repeats", "2", cwd=tmp_path)  # fmt: skip
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| bert-small | 16 | ")]
    assert [row[2] for row in rows] == ["training step", "featurize (default)"]
    assert rows[1][4] and float(rows[1][4]) > 0 and float(rows[1][6].rstrip(" |")) > 0.1  # a ratio, a peak in GiB
    seconds, tokens_per_second = float(rows[1][3]), float(rows[1][5])  # printed to 0.001 s and to 1 token / s
    assert 16 / (seconds + 0.0005) - 0.5 <= tokens_per_second <= 16 / max(seconds - 0.0005, 1e-9) + 0.5


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux's resettable VmHWM")
def test_the_llm_cost_benchmark_peak_memory_counts_from_its_reset():
    """The measurement's peak leaves out what the warm-up held before the reset, and counts what comes after."""
    sys.path.insert(0, BENCHMARKS)
    try:
        from llm_cost import peak_memory, reset_peak_memory
    finally:
        sys.path.remove(BENCHMARKS)
    cpu = torch.device("cpu")
    warm_up = torch.ones(2**27)  # 0.5 GiB, written
    del warm_up
    reset_peak_memory(cpu)
    start = peak_memory(cpu)
    measured = torch.ones(2**26)  # 0.25 GiB
    after = peak_memory(cpu)
    del measured
    assert start + 0.2 < after < start + 0.4  # the 0.25 GiB, not the 0.5 freed before the reset


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip without a GPU")
def test_the_llm_cost_benchmark_skips_cleanly_without_a_gpu(tmp_path):
    out = run("llm_cost.py", "--device", "cuda", "--models", "llama-1b", "--dtype", "bfloat16", cwd=tmp_path)
    assert out.strip() == "skipped: --device cuda but torch sees no CUDA device"
