"""``python -m flexpos.bench``: its JSON, its agreement with the dense path, its memory guard."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from support import TOLERANCE
from flexpos import bench
from flexpos.bench import cli

FIELDS = {
    "scheme", "length", "batch", "heads", "head_dim", "dtype", "mode", "device", "dense_ms", "flexpos_ms",
    "floor_ms", "speedup", "dense_peak_mb", "flexpos_peak_mb", "max_abs_diff", "dense_abs_diff", "compile_s", "dense_status",
    "flexpos_status",
}

SMALL = ["--lengths", "256", "--batch", "2", "--heads", "4", "--head-dim", "16", "--repeat", "1", "--quiet"]


def run(tmp_path, *args: str) -> dict:
    path = tmp_path / "bench.json"
    assert bench.main([*SMALL, *args, "--json", str(path)]) == 0
    return json.loads(path.read_text())


def test_default_path_matches_the_dense_path(tmp_path, capsys):
    """The default path against bio-attention's plugins, or the dense formulas."""
    dense = "bio" if bench.bio_available() else "formula"
    data = run(tmp_path, "--schemes", "alibi", "window", "--window", "40", "--dense", dense)
    assert data["command"].startswith("python -m flexpos.bench ") and "--window 40" in data["command"]
    assert data["settings"]["dense"] == dense
    assert {"torch", "cpu_count", "date"} <= set(data["machine"])
    rows = data["results"]
    assert [r["scheme"] for r in rows] == ["alibi", "window"]
    for r in rows:
        assert FIELDS <= set(r)
        assert r["flexpos_status"] == "ok" and r["dense_status"] == "ok", r
        assert r["max_abs_diff"] < 1e-4, r
        assert r["dense_ms"] > 0 and r["flexpos_ms"] > 0 and r["speedup"] == pytest.approx(
            r["dense_ms"] / r["flexpos_ms"], rel=0.005)
        assert r["compile_s"] >= 0
    table = capsys.readouterr().out
    assert "dense peak MiB" in table and "max |diff|" in table and "alibi" in table
    assert "dense |diff|" not in table and all(r["dense_abs_diff"] is None for r in rows)  # float32: none


@pytest.mark.parametrize("dense", ["formula", "bio"])
def test_every_scheme_forward_and_backward_agrees(tmp_path, dense):
    """Chunked backend (no compile): outputs and input gradients match the dense path."""
    if dense == "bio" and not bench.bio_available():
        pytest.skip("bio-attention is not installed")
    data = run(tmp_path, "--schemes", *bench.SCHEMES, "--backend", "chunked", "--mode", "fwdbwd", "--dense", dense)
    assert [r["scheme"] for r in data["results"]] == list(bench.SCHEMES)
    for r in data["results"]:
        assert r["mode"] == "fwd+bwd" and r["dense_status"] == "ok" and r["flexpos_status"] == "ok", r
        assert r["max_abs_diff"] < 2e-4, r


def test_bio_attentions_dense_path_runs_in_bfloat16(tmp_path, capsys):
    """Its float32 plugins get float32 copies of bfloat16 q and k (a bare call failed on the dtype
    mismatch for DPB and XL). Both paths are measured against the dense path in float32 on the
    same inputs: DPB's biases here reach hundreds, which the dense path casts to bfloat16 steps
    of 1-2 (it is the one off), while flexpos adds them to float32 scores."""
    if not bench.bio_available():
        pytest.skip("bio-attention is not installed")
    data = run(tmp_path, "--schemes", *bench.SCHEMES, "--backend", "chunked", "--dtype", "bfloat16", "--dense", "bio")
    for r in data["results"]:
        assert r["dense_status"] == "ok" and r["flexpos_status"] == "ok", r
        assert r["max_abs_diff"] < TOLERANCE[torch.bfloat16] and r["dense_abs_diff"] is not None, r
    dpb = next(r for r in data["results"] if r["scheme"] == "dpb")
    assert dpb["dense_abs_diff"] > 10 * dpb["max_abs_diff"], dpb
    out = capsys.readouterr().out
    assert "dense |diff|" in out and "from the dense path in float32 on the same inputs" in out


def test_dense_path_that_would_not_fit_is_reported_not_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench.run, "available_bytes", lambda device: 64 * 2**20)
    data = run(tmp_path, "--schemes", "xl", "--backend", "chunked")
    row = data["results"][0]
    assert row["dense_status"].startswith("skipped: would need")
    assert row["dense_ms"] is None and row["flexpos_ms"] > 0
    assert "would need" in capsys.readouterr().out


def test_dense_estimate_covers_the_measured_peak():
    """The guard's estimate is an upper bound of what the dense path really takes."""
    memory = bench.PeakMemory(torch.device("cpu"))
    if memory.method == "unavailable":
        pytest.skip("no way to measure memory here")
    for scheme in ("alibi", "dpb"):
        setup = bench.Setup(scheme, 1024, batch=1, heads=4, head_dim=16, dense="formula")
        case = bench.build_case(setup)
        with torch.no_grad():
            case.dense()
            _, peak = memory.measure(case.dense)
        assert peak * 2**20 <= case.dense_bytes, (scheme, peak, case.dense_bytes / 2**20)
        assert peak * 2**20 >= case.dense_bytes / 4, (scheme, peak, case.dense_bytes / 2**20)  # not absurdly loose


def test_peak_memory_sees_a_buffer():
    memory = bench.PeakMemory(torch.device("cpu"))
    if memory.method == "unavailable":
        pytest.skip("no way to measure memory here")
    _, peak = memory.measure(lambda: torch.ones(64 * 2**20 // 4).sum())
    assert 60 <= peak <= 100


def test_arguments_are_checked():
    with pytest.raises(SystemExit):
        bench.parse_args(["--schemes", "nope"])
    args = bench.parse_args(["--schemes", "alibi,dpb", "--lengths", "128", "256", "--device", "cpu"])
    assert args.schemes == ["alibi", "dpb"] and args.lengths == [128, 256] and args.dtype == "float32"
    again = bench.parse_args(["--lengths", "64", "--lengths", "128", "64", "--schemes", "dpb", "--schemes", "alibi,dpb"])
    assert again.lengths == [64, 128] and again.schemes == ["dpb", "alibi"]  # repeats add up, once each


def test_exit_status_says_whether_flexpos_failed_or_the_run_was_cut(tmp_path):
    """1 where flexpos failed on a case (here: CPU flex refuses gradients), 130 after Ctrl-C."""
    argv = [*SMALL, "--schemes", "alibi", "--backend", "flex", "--mode", "fwdbwd", "--device", "cpu"]
    assert bench.main(argv) == 1
    ok = bench.Row("alibi", 8, 1, 1, 1, "float32", "fwd", "cpu")
    assert cli.exit_code([ok], interrupted=False) == 0 and cli.exit_code([ok], interrupted=True) == 130


@pytest.mark.parametrize(
    "argv, option",
    [
        (["--batch", "0"], "--batch"),
        (["--batch", "-1"], "--batch"),
        (["--heads", "0"], "--heads"),
        (["--heads", "-2"], "--heads"),
        (["--head-dim", "-4"], "--head-dim"),
        (["--head-dim", "0"], "--head-dim"),
        (["--head-dim", "3", "--schemes", "rotary"], "--head-dim"),
        (["--heads", "3", "--head-dim", "3", "--schemes", "xl"], "--head-dim"),
        (["--repeat", "0"], "--repeat"),
        (["--lengths", "0"], "--lengths"),
        (["--lengths", "1.5"], "--lengths"),
        (["--lengths", ","], "--lengths"),
        (["--lengths", str(10**12)], "--lengths"),
        (["--batch", str(10**12)], "--batch"),
        (["--heads", "4096", "--head-dim", "4096", "--schemes", "xl"], "--head-dim"),
        (["--schemes", "alibi,nope"], "--schemes"),
        (["--schemes", ","], "--schemes"),
        (["--window", "-1"], "--window"),
        (["--window", "nan"], "--window"),
        (["--seed", str(2**65)], "--seed"),
        (["--seed", "2**65"], "--seed"),
        (["--device", "bogus"], "--device"),
        (["--device", "5"], "--device"),
        (["--device", "meta"], "--device"),
        (["--device", "cuda:99"], "--device"),
        (["--dtype", "float64"], "--dtype"),
        (["--mode", "bwd"], "--mode"),
        (["--json", "{tmp}"], "--json"),
        (["--json", ""], "--json"),
        (["--plot", "{tmp}"], "--plot"),
        (["--plot", "{tmp}/plot.xyz"], "--plot"),
        (["--plot", "{tmp}/plot"], "--plot"),
        (["--json", "{tmp}/out.png", "--plot", "{tmp}/out.png"], "--plot"),
    ],
)
def test_a_bad_value_is_an_argparse_error_naming_its_option(tmp_path, monkeypatch, capsys, argv, option):
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: object())  # as with matplotlib
    with pytest.raises(SystemExit) as exit:
        bench.parse_args([a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "error: " in err and option in err and "Traceback" not in err


def test_dense_bio_without_bio_attention_is_an_argparse_error(monkeypatch, capsys):
    monkeypatch.setattr(cli, "bio_available", lambda: False)
    with pytest.raises(SystemExit) as exit:
        bench.parse_args(["--dense", "bio", "--device", "cpu"])
    assert exit.value.code == 2 and "--dense bio needs bio-attention" in capsys.readouterr().err


def test_an_unwritable_output_path_is_refused_before_the_run(tmp_path, monkeypatch, capsys):
    """Opened as the end of the run will open it (``os.access`` says yes to root for any path)."""
    def refuse(path, mode="r"):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(cli, "open", refuse, raising=False)
    path = tmp_path / "out.json"
    with pytest.raises(SystemExit):
        bench.parse_args(["--json", str(path), "--device", "cpu"])
    assert f"--json {path}: not writable (Permission denied)" in capsys.readouterr().err


def test_edge_values_are_accepted():
    """inf (no window), torch's seed range; a combination the library refuses on CPU is left to
    the run, which reports it in the table."""
    args = bench.parse_args(["--window", "inf", "--seed", str(2**64 - 1), "--head-dim", "3", "--schemes", "alibi",
                             "--device", "cpu", "--backend", "flex", "--mode", "fwdbwd"])
    assert args.window == float("inf") and args.seed == 2**64 - 1 and args.head_dim == 3
    assert bench.parse_args(["--seed", "-1", "--device", "cpu"]).seed == -1


def test_plot_without_matplotlib_is_refused_before_the_run(monkeypatch, capsys):
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: None)  # as without matplotlib
    with pytest.raises(SystemExit):
        bench.parse_args(["--plot", "p.png", "--device", "cpu"])
    assert "--plot needs matplotlib" in capsys.readouterr().err


def test_output_paths_that_are_links_or_pipes_are_left_as_they_are(tmp_path):
    """A dangling symlink keeps pointing at a file not yet written; a FIFO is not opened (that
    would block until a reader comes)."""
    link, fifo = tmp_path / "link.json", tmp_path / "fifo.json"
    link.symlink_to(tmp_path / "target.json")
    os.mkfifo(fifo)
    assert bench.parse_args(["--json", str(link), "--device", "cpu"]).json
    assert link.is_symlink() and not (tmp_path / "target.json").exists()
    assert bench.parse_args(["--json", str(fifo), "--device", "cpu"]).json == str(fifo)


def test_an_output_path_in_a_missing_folder_is_refused_before_the_run(tmp_path, capsys):
    missing = tmp_path / "missing" / "out.json"
    with pytest.raises(SystemExit):
        bench.parse_args(["--json", str(missing), "--device", "cpu"])
    assert f"--json {missing}: no folder {missing.parent}" in capsys.readouterr().err
    assert bench.parse_args(["--json", str(tmp_path / "out.json"), "--device", "cpu"]).json
    assert not (tmp_path / "out.json").exists()  # the check leaves no empty file behind


def test_the_memory_round_is_not_timed_unless_a_path_is_slow():
    """The round that probes peak memory carries the probe's cost: medians come from the
    ``repeat`` rounds after it, except for paths slower than ``slow_s``, which run once."""
    from flexpos.bench.run import Row, Runner, _time_paths

    def run(probe_seconds: float) -> tuple[float, int]:
        class Probe:
            def measure(self, fn):
                fn()
                return probe_seconds, 1.0

        calls = []
        path = lambda: calls.append(1) or torch.zeros(1)  # noqa: E731
        row = Row("alibi", 8, 1, 1, 1, "float32", "fwd", "cpu")
        times = _time_paths({"flexpos": path}, Runner(torch.device("cpu"), False, []), Probe(), row, 3, 5.0)
        assert row.flexpos_peak_mb == 1.0
        return times["flexpos"], len(calls)

    seconds, calls = run(0.5)  # a fast path: the probe's 0.5 s is not in its median
    assert seconds < 0.1 and calls == 4
    assert run(9.0) == (9.0, 1)  # a slow path runs once


def test_flexpos_memory_is_foreseen_from_smaller_lengths():
    assert bench.foresee([], 4096) is None
    assert bench.foresee([(1024, 8.0)], 4096) == pytest.approx(128 * 2**20)  # as L**2 from one length
    assert bench.foresee([(1024, 8.0), (4096, 32.0)], 32768) == pytest.approx(256 * 2**20)  # measured: linear


@pytest.mark.parametrize(
    "argv0, expected",
    [
        ("/venv/bin/flexpos-bench", "flexpos-bench"),
        ("/src/flexpos/bench/__main__.py", "python -m flexpos.bench"),
        ("/src/flexpos/__main__.py", "python -m flexpos"),
    ],
)
def test_usage_and_json_name_the_command_that_was_run(monkeypatch, argv0, expected):
    monkeypatch.setattr(sys, "argv", [argv0])
    assert cli.program() == expected


def test_machine_facts_name_the_installed_flexpos():
    from importlib.metadata import version

    import flexpos
    from flexpos.bench.report import machine_facts

    assert flexpos.__version__ == version("flexpos")  # one source: pyproject reads __version__
    assert machine_facts(torch.device("cpu"))["flexpos"] == flexpos.__version__
