import collections
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import monitor_toy as mtoy  # noqa: E402
import toy_pretrain as toy  # noqa: E402

from soco_d2.engine.trainer import PretrainTrainer  # noqa: E402
from soco_d2.evaluation.knn import ProbeDataError  # noqa: E402
from soco_d2.modeling import build_model  # noqa: E402


# The modules of the monitors, whose host syncs are counted.
MONITOR_MODULES = tuple(f"soco_d2/engine/{m}.py" for m in ("monitors", "model_taps", "health_metrics"))


def _run(tmp_path, name, overrides, resume=False, model_cls=mtoy.MonitorToyNet):
    cfg = toy.toy_cfg(tmp_path / name, **overrides)
    torch.manual_seed(0)
    trainer = PretrainTrainer(cfg, model=model_cls(cfg), dataset=toy.ToyDataset())
    trainer.resume_or_load(resume)
    trainer.train()
    return trainer


def _rows(path):
    from soco_d2.engine.writers import read_metrics

    return read_metrics(str(path / "metrics.json"))


def test_monitors_in_a_run_and_no_effect_on_training(tmp_path):
    probe = mtoy.make_labeled_folder(tmp_path / "probe")
    on = mtoy.monitor_overrides(probe, **{"SOLVER.MAX_ITER": 5, "SOLVER.CHECKPOINT_PERIOD": 3})
    _run(tmp_path, "on", on)
    _run(tmp_path, "off", {"SOLVER.MAX_ITER": 5, "SOLVER.CHECKPOINT_PERIOD": 3})
    a = torch.load(tmp_path / "on" / "model_final.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "off" / "model_final.pth", weights_only=True)["model"]
    for k in b:  # weights, BN running statistics and the queue: the monitors changed nothing
        assert torch.equal(a[k], b[k]), k

    rows = _rows(tmp_path / "on")
    knn = [r for r in rows if "knn_pool_top1" in r]
    # iteration 0, every PERIOD (2, 4) and the end (5)
    assert [r["iteration"] for r in knn] == [0, 2, 4, 5]
    assert all(0 <= r["knn_pool_top1"] <= r["knn_pool_top5"] <= 100 for r in knn)
    assert all(r["knn_time"] > 0 for r in knn)
    from soco_d2.evaluation.knn import build_probe_split, sampling_noise
    num_val = len(build_probe_split(str(probe)).val)
    for r in knn:  # the sampling noise of each accuracy beside it
        assert r["knn_pool_top1_2se"] == pytest.approx(sampling_noise(r["knn_pool_top1"], num_val))
        assert r["knn_pool_top5_2se"] == pytest.approx(sampling_noise(r["knn_pool_top5"], num_val))
    health = [r for r in rows if "rankme" in r]
    assert [r["iteration"] for r in health] == [2, 4, 5]  # LOG_PERIOD 2 and the end
    assert all(1.0 <= r["rankme"] <= 4.0 and 0 < r["emb_std"] <= 1 for r in health)
    # monitor values share the line of the losses where they coincide
    assert "total_loss" in health[0]
    assert (tmp_path / "on" / "monitor_curves.png").stat().st_size > 1000

    # resume from the checkpoint at 3 with the monitors on: same weights as the run without them
    run = tmp_path / "resumed"
    run.mkdir()
    for f in ("model_0000003.pth",):
        (run / f).write_bytes((tmp_path / "off" / f).read_bytes())
    (run / "last_checkpoint").write_text("model_0000003.pth")
    trainer = _run(tmp_path, "resumed", on, resume=True)
    assert trainer.start_iter == 3
    c = torch.load(run / "model_final.pth", weights_only=True)["model"]
    for k in b:
        assert torch.equal(c[k], b[k]), k
    assert [r["iteration"] for r in _rows(run) if "knn_pool_top1" in r] == [4, 5]  # no 0 on resume


def test_probe_leaves_train_and_eval_flags_as_they_were(tmp_path):
    probe = mtoy.make_labeled_folder(tmp_path / "probe")
    cfg = toy.toy_cfg(tmp_path / "run", **mtoy.monitor_overrides(probe))
    model = mtoy.MonitorToyNet(cfg)
    trainer = PretrainTrainer(cfg, model=model, dataset=toy.ToyDataset())
    model.train()
    model.target.eval()  # a module deliberately in eval mode stays so
    mean = model.online[1].running_mean.clone()
    trainer.writers = []
    trainer.monitors.before_train()
    assert model.training and model.online.training and not model.target.training
    assert torch.equal(model.online[1].running_mean, mean)  # BN ran with running statistics


def test_bn_stats_train_probes_with_statistics_of_the_probe_images(tmp_path):
    """MONITOR.KNN.BN_STATS train: the probe normalises with statistics recomputed over the probe's
    training images, the model keeps its own, and the training stream is unchanged."""
    probe = mtoy.make_labeled_folder(tmp_path / "probe")
    cfg = toy.toy_cfg(tmp_path / "run", **mtoy.monitor_overrides(probe, **{"MONITOR.KNN.BN_STATS": "train"}))
    model = mtoy.MonitorToyNet(cfg)
    trainer = PretrainTrainer(cfg, model=model, dataset=toy.ToyDataset())
    own = model.online[1].running_mean.clone()
    trainer.writers = []
    trainer.monitors.before_train()
    assert torch.equal(model.online[1].running_mean, own)
    assert int(model.online[1].num_batches_tracked) == 0
    # expected: the mean over the probe's training batches (BATCH_SIZE 4) of conv1's batch means
    images = trainer.monitors._images[0].images
    mean = torch.tensor(cfg.MODEL.PIXEL_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(cfg.MODEL.PIXEL_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        out = model.online[0]((images.float() - mean) / std)
    bounds = list(range(0, len(images), 4)) + [len(images)]
    if bounds[-1] - bounds[-2] == 1:
        del bounds[-2]
    expected = torch.stack([out[a:b].mean(dim=(0, 2, 3)) for a, b in zip(bounds[:-1], bounds[1:])]).mean(0)
    assert model.probe_bn_means  # the probe ran in eval mode
    for seen in model.probe_bn_means:
        torch.testing.assert_close(seen, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(expected, own)

    # a whole run: the same weights and statistics as the run with the monitors off
    on = mtoy.monitor_overrides(probe, **{"SOLVER.MAX_ITER": 4, "MONITOR.KNN.BN_STATS": "train"})
    _run(tmp_path, "on", on)
    _run(tmp_path, "off", {"SOLVER.MAX_ITER": 4})
    a = torch.load(tmp_path / "on" / "model_final.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "off" / "model_final.pth", weights_only=True)["model"]
    for k in b:
        assert torch.equal(a[k], b[k]), k


def test_slow_probe_warns_with_measured_times(tmp_path, soco_log, monkeypatch):
    """The monitor's clock advances 10 s per feature extraction and not at all in training: the
    probe (20 s) is slower than the training since the previous probe (0 s)."""
    import types

    import soco_d2.engine.monitors as monitors

    probe = mtoy.make_labeled_folder(tmp_path / "probe")
    clock = [0.0]
    real = monitors.extract_features

    def slow(*args, **kwargs):
        clock[0] += 10.0
        return real(*args, **kwargs)

    monkeypatch.setattr(monitors, "extract_features", slow)
    monkeypatch.setattr(monitors, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    _run(tmp_path, "run", mtoy.monitor_overrides(probe, **{"MONITOR.KNN.PERIOD": 1, "SOLVER.MAX_ITER": 2}))
    msgs = [m for m in soco_log if "kNN probe at iteration" in m]
    assert len(msgs) == 2  # iterations 1 and 2; none at 0 (no training interval yet)
    assert "took 20.0 s, longer than the 0.0 s of training" in msgs[0]
    assert "MONITOR.KNN.PERIOD = 1" in msgs[0]
    rows = [r for r in _rows(tmp_path / "run") if "knn_time" in r]
    assert [r["knn_time"] for r in rows] == [20.0, 20.0, 20.0]


def test_collapse_is_reported(tmp_path, soco_log):
    class Collapsed(mtoy.MonitorToyNet):
        def __init__(self, cfg, **kw):
            super().__init__(cfg, **kw)
            with torch.no_grad():  # the fc maps everything to one point
                self.online[5].weight.zero_()
                self.online[5].bias = torch.nn.Parameter(torch.ones(4))

    _run(tmp_path, "run", {"MONITOR.HEALTH.ENABLED": True, "SOLVER.MAX_ITER": 2,
                           "SOLVER.BASE_LR": 0.0}, model_cls=Collapsed)
    assert any("Embedding collapse at iteration 2" in m for m in soco_log)
    rows = [r for r in _rows(tmp_path / "run") if "rankme" in r]
    assert rows[-1]["emb_std"] < 1e-6


def test_rank_drop_is_reported_and_a_steady_rank_is_not(tmp_path, soco_log):
    class Narrowing(mtoy.MonitorToyNet):
        """Full-rank projector outputs for two steps, then only their first coordinate (``calls``:
        the toy's count of forward calls, one per step)."""

        def __init__(self, cfg, **kw):
            super().__init__(cfg, **kw)
            self.projector.register_forward_hook(self._narrow)

        def _narrow(self, module, inputs, output):
            return output * torch.tensor([1.0, 0.0, 0.0, 0.0]) if self.calls > 2 else output

    overrides = {"MONITOR.HEALTH.ENABLED": True, "MONITOR.HEALTH.PERIOD": 1, "MONITOR.HEALTH.WINDOW": 4,
                 "MONITOR.HEALTH.RANK_DROP_RATIO": 0.5, "MONITOR.HEALTH.COLLAPSE_STD_RATIO": 0.0,
                 "SOLVER.MAX_ITER": 4, "SOLVER.BASE_LR": 0.0}
    _run(tmp_path, "steady", overrides)
    assert not any("Dimensional collapse" in m for m in soco_log)
    _run(tmp_path, "narrowing", overrides, model_cls=Narrowing)
    warned = [m for m in soco_log if "Dimensional collapse" in m]
    assert len(warned) == 1 and "at iteration 3" in warned[0]  # once: rate-limited
    ranks = [r["rankme"] for r in _rows(tmp_path / "narrowing") if "rankme" in r]
    assert ranks[-1] < 0.5 * max(ranks[:2])


@pytest.mark.parametrize("key, value", [("WINDOW", 1), ("PERIOD", -1), ("COLLAPSE_STD_RATIO", -0.1),
                                        ("RANK_DROP_RATIO", 1.0), ("RANK_DROP_RATIO", -0.5)])
def test_bad_health_settings_fail_before_training(tmp_path, key, value):
    cfg = toy.toy_cfg(tmp_path / "run", **{"MONITOR.HEALTH.ENABLED": True, f"MONITOR.HEALTH.{key}": value})
    with pytest.raises(ValueError, match=rf"MONITOR.HEALTH: .*{key} \({value}\)"):
        PretrainTrainer(cfg, model=mtoy.MonitorToyNet(cfg), dataset=toy.ToyDataset())


def test_bad_probe_settings_fail_before_training(tmp_path):
    one = mtoy.make_labeled_folder(tmp_path / "one", classes=("red",))
    cfg = toy.toy_cfg(tmp_path / "run", **mtoy.monitor_overrides(one))
    with pytest.raises(ProbeDataError, match=r"MONITOR.KNN.TRAIN_ROOT.*1 usable class"):
        PretrainTrainer(cfg, model=mtoy.MonitorToyNet(cfg), dataset=toy.ToyDataset())
    cfg = toy.toy_cfg(tmp_path / "run", **mtoy.monitor_overrides(""))
    with pytest.raises(ProbeDataError, match="MONITOR.KNN.TRAIN_ROOT = '' is not a folder"):
        PretrainTrainer(cfg, model=mtoy.MonitorToyNet(cfg), dataset=toy.ToyDataset())
    two = mtoy.make_labeled_folder(tmp_path / "two", classes=("red", "blue"))
    cfg = toy.toy_cfg(tmp_path / "run", **mtoy.monitor_overrides(two, **{"MONITOR.KNN.BN_STATS": "running"}))
    with pytest.raises(ProbeDataError, match=r"MONITOR.KNN.BN_STATS must be one of \('weights', 'train'\), got 'running'"):
        PretrainTrainer(cfg, model=mtoy.MonitorToyNet(cfg), dataset=toy.ToyDataset())


def test_detco_chance_level_is_reported(tmp_path):
    from soco_d2.engine.monitors import Monitors

    cfg, model = mtoy.tiny_method("DetCo", **{"MONITOR.HEALTH.ENABLED": True})

    class T:  # what Monitors reads of a trainer
        pass

    t = T()
    t.model, t.start_iter, t.max_iter, t.writers = model, 0, 10, []
    mon = Monitors(cfg, t)
    assert mon.chance_level == pytest.approx(math.log(17))
    mon.after_step(cfg.LOG_PERIOD)
    assert mon.pop_metrics()["chance_level"] == pytest.approx(math.log(17))
    mon.close()


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    """Each process extracts half of the probe images; the gathered features give the same kNN
    accuracy as one process, and the health figures of the gathered window agree."""
    from soco_d2.engine.launch import launch

    probe = mtoy.make_labeled_folder(tmp_path / "probe", per_class=5)  # odd shares per process
    overrides = mtoy.monitor_overrides(probe, **{"SOLVER.MAX_ITER": 2, "SOLVER.CHECKPOINT_PERIOD": 0,
                                                 "MONITOR.KNN.PERIOD": 0})
    launch(mtoy.train_and_dump, num_gpus_per_machine=2, backend="gloo",
           args=(str(tmp_path / "two"), str(tmp_path / "two.pt"), overrides))
    mtoy.train_and_dump(str(tmp_path / "one"), str(tmp_path / "one.pt"), overrides)
    one = torch.load(tmp_path / "one.pt", weights_only=False)["rows"]
    two = torch.load(tmp_path / "two.pt", weights_only=False)["rows"]
    k1 = [r for r in one if "knn_pool_top1" in r]
    k2 = [r for r in two if "knn_pool_top1" in r]
    assert [r["iteration"] for r in k2] == [0, 2]
    assert k1[0]["knn_pool_top1"] == k2[0]["knn_pool_top1"]  # same initial weights
    assert k1[0]["knn_pool_top5"] == k2[0]["knn_pool_top5"]
    h1 = [r for r in one if "rankme" in r][-1]
    h2 = [r for r in two if "rankme" in r][-1]
    assert h2["rankme"] == pytest.approx(h1["rankme"], rel=1e-3)
    assert h2["emb_std"] == pytest.approx(h1["emb_std"], rel=1e-3)


def test_two_gloo_processes_share_recomputed_bn_statistics(tmp_path):
    """BN_STATS train with two processes and per-process BN (DetCo): each recomputes over its share
    of the probe images and both probe with the image-weighted average of the two."""
    from soco_d2.engine.launch import launch

    probe = mtoy.make_labeled_folder(tmp_path / "probe", per_class=5)
    overrides = mtoy.monitor_overrides(probe, **{"SOLVER.MAX_ITER": 1, "SOLVER.CHECKPOINT_PERIOD": 0,
                                                 "MONITOR.KNN.PERIOD": 0, "MONITOR.KNN.BN_STATS": "train",
                                                 "MONITOR.HEALTH.ENABLED": False})
    dump = str(tmp_path / "two.pt")
    launch(mtoy.train_and_dump, num_gpus_per_machine=2, backend="gloo",
           args=(str(tmp_path / "two"), dump, overrides, False))
    seen = [torch.load(f"{dump}.bn{r}", weights_only=False) for r in (0, 1)]
    for a, b in ((seen[0][0], seen[1][0]), (seen[0][-1], seen[1][-1])):  # at iteration 0 and 1
        assert torch.equal(a, b)  # the same statistics on both processes
    assert float(seen[0][0].abs().max()) > 1e-3  # recomputed, not the initial zeros


class _TrainerStub:
    """What :class:`Monitors` reads of a trainer."""

    def __init__(self, model, max_iter=10):
        self.model, self.start_iter, self.max_iter, self.writers = model, 0, max_iter, []


def test_health_window_of_the_faithful_head_holds_the_rows_the_loss_uses():
    """The faithful head runs every box on all four levels; the loss (and the window) uses each
    box's row of its assigned level only: one row per box and box set, not four."""
    from soco_d2.engine.monitors import Monitors

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "modeling", "meta_arch"))
    from soco_tiny import random_batch

    n, k = 2, 3
    batch = random_batch(n, k)
    for mode in ("faithful", "per_view"):
        cfg, model = mtoy.tiny_method("SoCo", **{"MODEL.SOCO.HEAD_MODE": mode, "MONITOR.HEALTH.ENABLED": True,
                                      "MONITOR.HEALTH.WINDOW": 1000})
        model.train()
        mon = Monitors(cfg, _TrainerStub(model))
        every_row = []
        handle = model.projector[-1].register_forward_hook(lambda m, i, out: every_row.append(out.detach()))
        with torch.no_grad():
            model(batch)
        handle.remove()
        window = mon._window.matrix().cpu()
        mon.close()
        # the rows of each box set's boxes on their assigned levels, from the whole projector output
        sets = [(p[f"boxes_{s}"]) for s in ("a", "b") for p in batch["pairs"]]
        assert window.shape == (len(sets) * n * k, 8), mode
        if mode == "faithful":
            # one projector call over the box sets (V1's two, V2's, V3's), each level-major
            per_set = torch.cat(every_row).view(len(sets), 4, n * k, -1)
            assigned = [s[model.pooler.assign_levels(b), torch.arange(n * k)] for s, b in zip(per_set, sets)]
            rows = collections.Counter(map(tuple, window.tolist()))
            assert rows == collections.Counter(map(tuple, torch.cat(assigned).tolist()))


def test_health_window_is_copied_to_the_host_once_per_period():
    """Counted on a fake GPU (tests/fake_cuda.py): no device-to-host copy of the monitor in a
    forward, one when the health figures are computed."""
    from soco_d2.engine.monitors import Monitors

    sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "modeling", "meta_arch"))
    import fake_cuda
    from soco_tiny import random_batch

    cfg, _ = mtoy.tiny_method("SoCo", **{"MODEL.DEVICE": "cuda", "MONITOR.HEALTH.ENABLED": True,
                              "MONITOR.HEALTH.PERIOD": 3})
    batch = random_batch(2)
    with fake_cuda.fake_cuda() as mode:
        with torch.device(fake_cuda.DEVICE):
            model = build_model(cfg).to(fake_cuda.DEVICE).train()
        mon = Monitors(cfg, _TrainerStub(model))
        batch = fake_cuda.to_fake_device(mode, batch)

        def monitor_syncs(fn, *args):
            with fake_cuda.HostSyncRecorder() as recorder:
                fn(*args)
            return [s for s in recorder.syncs if s.where.startswith(MONITOR_MODULES)]

        for it in (1, 2):
            assert monitor_syncs(model, batch) == []
            assert monitor_syncs(mon.after_step, it) == []
        assert monitor_syncs(model, batch) == []
        syncs = monitor_syncs(mon.after_step, 3)
        assert [s.kind for s in syncs] == ["device to host"]
        assert mon.pending
        mon.close()
