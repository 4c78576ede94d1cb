

def test_bench_step_runs_both_modes() -> None:
    from metalr_bench.benchmark.bench_step import main

    (row,) = main(["--arch", "smallcnn", "--size", "16", "--batch", "4", "--in-channels", "1",
                   "--device", "cpu", "--warmup", "1", "--iters", "2", "--no-memory"])
    assert row["full_s"] > 0 and row["metalr_s"] > 0
    assert row["time_ratio"] == pytest.approx(row["metalr_s"] / row["full_s"])
