"""benchmarks/paired_timing.py: alternating rounds and the ratio report."""
import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _module():
    spec = importlib.util.spec_from_file_location("paired_timing", os.path.join(REPO, "benchmarks", "paired_timing.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rounds_alternate_and_warmup_is_not_timed(capsys):
    calls = []
    times, cpu = _module().run_alternating([("a", lambda r: calls.append(("a", r))),
                                            ("b", lambda r: calls.append(("b", r)))], warmup=1, timed=3)
    assert calls == [("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 2), ("b", 2), ("b", 3), ("a", 3)]
    assert len(times["a"]) == len(cpu["b"]) == 3
    assert "round 0 (warmup) a" in capsys.readouterr().out


def test_report_gives_medians_and_the_ratio_of_the_first_to_the_second(capsys):
    med = _module().report({"ours": [2.0, 3.0, 10.0], "theirs": [4.0, 6.0, 5.0]},
                           {"ours": [1.0, 1.0, 1.0], "theirs": [2.0, 2.0, 2.0]})
    assert med == {"ours": 3.0, "theirs": 5.0}
    out = capsys.readouterr().out
    assert "ratio ours / theirs: medians 0.600 (wall), 0.500 (CPU)" in out
    assert "| ours | 3.000 | 1.000 | 2.00, 3.00, 10.00 |" in out


def test_profile_sums_each_operator_per_contestant_and_shows_the_difference(capsys):
    import torch

    x = torch.randn(64, 64)
    calls = []

    def plain(r):
        calls.append(("plain", r))
        torch.mm(x, x)

    def extra(r):
        calls.append(("extra", r))
        torch.mm(x, x)
        torch.sigmoid(x)

    totals = _module().profile_alternating([("extra", extra), ("plain", plain)], rounds=2, top=10)
    assert calls == [("extra", 0), ("plain", 0), ("plain", 1), ("extra", 1)]
    assert totals["extra"]["aten::sigmoid"] > 0 and "aten::sigmoid" not in totals["plain"]
    assert totals["extra"]["aten::mm"] > 0 and totals["plain"]["aten::mm"] > 0
    out = capsys.readouterr().out
    assert "| aten::sigmoid |" in out and "| all operators |" in out
    assert "| process CPU time outside operators |" in out
