import importlib.util
import json
import os
import sys

import pytest
import torch
import torchvision

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "engine"))
import monitor_toy as mtoy  # noqa: E402

from soco_d2.checkpoint import convert_to_d2, save_d2_pkl  # noqa: E402
from soco_d2.config import get_cfg  # noqa: E402
from soco_d2.evaluation.knn import ProbeImages, sampling_noise  # noqa: E402
from soco_d2.evaluation.probe import (  # noqa: E402
    PIXEL_MEAN, PIXEL_STD, load_probe_backbone, recompute_bn_statistics)
from soco_d2.modeling import build_model  # noqa: E402

TOOL = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "probe.py")


def _main(*args):
    spec = importlib.util.spec_from_file_location("probe_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main([str(a) for a in args])


def _normalised(images):
    return (images - torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1)) / torch.tensor(PIXEL_STD).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """One file of every kind, all ResNet-18, and the res5 features each must reproduce."""
    d = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32) * 255
    out = {}
    cfg = get_cfg()
    cfg.merge_from_list(["MODEL.META_ARCHITECTURE", "SoCo", "MODEL.DEVICE", "cpu",
                         "MODEL.RESNETS.DEPTH", 18, "MODEL.FPN.OUT_CHANNELS", 16,
                         "MODEL.ROI_BOX_HEAD.NUM_CONV", 1, "MODEL.ROI_BOX_HEAD.CONV_DIM", 8,
                         "MODEL.ROI_BOX_HEAD.FC_DIM", 16, "MODEL.SOCO.PROJECTOR_HIDDEN_DIM", 8,
                         "MODEL.SOCO.PROJECTOR_OUT_DIM", 8, "MODEL.SOCO.PREDICTOR_HIDDEN_DIM", 8])
    soco = build_model(cfg).eval()
    with torch.no_grad():  # make the BN statistics and the target differ from the defaults
        for name, buf in soco.named_buffers():
            if "running_mean" in name:
                buf.normal_(0, 0.1)
        for p in soco.target_backbone.parameters():
            p.add_(1.0)
        soco_res5 = soco.backbone.body(_normalised(x))["3"].mean(dim=(2, 3))
        target_res5 = soco.target_backbone.body(_normalised(x))["3"].mean(dim=(2, 3))
    torch.save({"model": soco.state_dict(), "iteration": 3}, d / "soco.pth")
    out["ours"] = (d / "soco.pth", soco_res5)
    d2, _ = convert_to_d2(str(d / "soco.pth"), parts=("backbone",))
    save_d2_pkl(d2, d / "soco.pkl")
    out["pkl"] = (d / "soco.pkl", soco_res5)
    tv = torchvision.models.resnet18()
    tv.fc = torch.nn.Identity()
    with torch.no_grad():
        tv.bn1.running_mean.normal_(0, 0.1)
        tv_res5 = tv.eval()(_normalised(x))
    torch.save({f"{k}": v for k, v in tv.state_dict().items()}, d / "tv.pth")
    out["torchvision"] = (d / "tv.pth", tv_res5)
    moco = {f"module.encoder_q.{k}": v for k, v in tv.state_dict().items()}
    moco.update({f"module.encoder_k.{k}": v + 1 for k, v in tv.state_dict().items()})
    moco["module.encoder_q.fc.0.weight"] = torch.zeros(512, 512)
    moco["module.encoder_q.fc.2.weight"] = torch.zeros(128, 512)
    moco["module.queue"] = torch.zeros(128, 64)
    torch.save({"state_dict": moco, "epoch": 200, "arch": "resnet18"}, d / "moco.pth.tar")
    out["moco"] = (d / "moco.pth.tar", tv_res5)
    return x, out, target_res5


@pytest.mark.parametrize("kind", ["ours", "pkl", "torchvision", "moco"])
def test_each_weight_kind_gives_the_features_of_its_source(weights, kind):
    x, files, _ = weights
    path, expected = files[kind]
    b = load_probe_backbone(str(path))
    assert b.depth == 18
    with torch.no_grad():
        torch.testing.assert_close(b.model(_normalised(x)), expected, rtol=1e-4, atol=1e-5)


def test_target_branch_and_random_init(weights):
    x, files, target_res5 = weights
    b = load_probe_backbone(str(files["ours"][0]), branch="target")
    with torch.no_grad():
        torch.testing.assert_close(b.model(_normalised(x)), target_res5, rtol=1e-4, atol=1e-5)
    r1 = load_probe_backbone(random_init=True, depth=18, seed=1)
    r2 = load_probe_backbone(random_init=True, depth=18, seed=1)
    r3 = load_probe_backbone(random_init=True, depth=18, seed=2)
    assert torch.equal(r1.model.conv1.weight, r2.model.conv1.weight)
    assert not torch.equal(r1.model.conv1.weight, r3.model.conv1.weight)
    with pytest.raises(ValueError, match="--depth"):
        load_probe_backbone(random_init=True)


def test_cli_ranks_every_kind_on_a_folder(weights, tmp_path, capsys):
    _, files, _ = weights
    probe = mtoy.make_labeled_folder(tmp_path / "probe", per_class=4, size=24)
    out = tmp_path / "res.jsonl"
    rc = _main("--weights", *[files[k][0] for k in ("ours", "pkl", "torchvision", "moco")],
               "--random-init", "--depth", 18, "--train-root", probe, "--image-size", 16,
               "--k", 3, "--linear", "--output", out)
    assert rc == 0
    text = capsys.readouterr().out
    assert "probe data: 3 classes, 6 train / 6 val images" in text
    assert f"  from {os.path.abspath(files['pkl'][0])} (" in text and "sha256 " in text
    assert "torch " + torch.__version__ in text  # the environment
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5 and rows[-1]["name"] == "random-init R18 seed 0"
    for r in rows:
        assert 0 <= r["knn_top1"] <= r["knn_top5"] <= 100 and 0 <= r["linear_top1"] <= 100
        assert r["train_images"] == 6 and r["val_images"] == 6 and r["classes"] == 3
    # the .pkl converted from our checkpoint holds the same backbone: the same accuracy
    assert rows[0]["knn_top1"] == rows[1]["knn_top1"] and rows[2]["knn_top1"] == rows[3]["knn_top1"]
    lines = text.splitlines()
    assert "knn_top1 +- 2se" in lines[-7]  # the table header
    # beside each accuracy, two standard errors over the 6 validation images
    best = max(rows, key=lambda r: r["knn_top1"])
    assert f"{best['knn_top1']:>9.2f} +- {sampling_noise(best['knn_top1'], 6):>4.1f}" in lines[-6]
    # progress before the table: decoding, then features and the result of each backbone
    assert "decoding 6 training and 6 validation images at 16 px" in text
    assert "[5/5] random-init R18 seed 0: kNN top-1" in text
    assert text.index("[1/5]") < text.index("knn_top1 +- 2se")


def _probe_images(n, size=16, seed=0):
    images = ProbeImages([], size)
    g = torch.Generator().manual_seed(seed)
    images.images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    images.valid = torch.ones(n, dtype=torch.bool)
    return images


@pytest.mark.parametrize("n,batch,sizes", [(10, 4, [4, 4, 2]), (9, 4, [4, 5]), (4, 4, [4])])
def test_recompute_bn_statistics_averages_the_batches(n, batch, sizes):
    """n readable images (and one unreadable, left out) in batches of the given sizes: a last
    batch of one image joins the one before."""
    net = load_probe_backbone(random_init=True, depth=18, seed=0).model
    images = _probe_images(n + 1)
    images.valid[1] = False
    x = _normalised(images.images[images.valid].float())
    # the stem BN sees conv1's output: its batch means, averaged with equal weights
    with torch.no_grad():
        out = net.conv1(x)
    bounds = torch.tensor([0] + sizes).cumsum(0).tolist()
    expected = torch.stack([out[a:b].mean(dim=(0, 2, 3)) for a, b in zip(bounds[:-1], bounds[1:])]).mean(0)
    used = recompute_bn_statistics(net, images, torch.device("cpu"), batch)
    assert used == len(x)
    torch.testing.assert_close(net.bn1.running_mean, expected, rtol=1e-4, atol=1e-5)
    assert int(net.bn1.num_batches_tracked) == len(sizes)
    assert not net.training and not any(m.training for m in net.modules())
    assert all(m.momentum == 0.1 for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    with pytest.raises(ValueError, match="at least 2 readable"):
        recompute_bn_statistics(net, _probe_images(1), torch.device("cpu"), batch)


def test_cli_bn_stats_train_changes_a_random_init_and_says_so(tmp_path):
    probe = mtoy.make_labeled_folder(tmp_path / "probe", per_class=4, size=24)
    rows = {}
    for mode in ("weights", "train"):
        out = tmp_path / f"{mode}.jsonl"
        assert _main("--random-init", "--depth", 18, "--train-root", probe, "--image-size", 32,
                     "--k", 3, "--bn-stats", mode, "--output", out) == 0
        (rows[mode],) = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows["weights"]["bn_stats"] == "weights" and rows["train"]["bn_stats"] == "train"
    from soco_d2.evaluation.knn import build_probe_split
    from soco_d2.evaluation.probe import probe_backbones

    split = build_probe_split(str(probe))
    b = load_probe_backbone(random_init=True, depth=18, seed=0)
    with pytest.raises(ValueError, match="bn_stats must be one of"):
        probe_backbones([b], split, 32, bn_stats="running")
    (r,) = probe_backbones([b], split, 32, k=3, bn_stats="train")
    assert r["knn_top1"] == rows["train"]["knn_top1"]
    assert float(b.model.bn1.running_var.sub(1).abs().max()) > 1e-3  # the statistics changed


def test_cli_bad_input(tmp_path, capsys):
    probe = mtoy.make_labeled_folder(tmp_path / "one", classes=("red",), per_class=3)
    assert _main("--random-init", "--depth", 18, "--train-root", probe) == 2
    assert "--train-root = " in capsys.readouterr().err
    good = mtoy.make_labeled_folder(tmp_path / "good", per_class=2)
    assert _main("--train-root", good) == 2
    assert "--random-init" in capsys.readouterr().err
    assert _main("--random-init", "--train-root", good) == 2
    assert "needs --depth" in capsys.readouterr().err
    assert _main("--weights", tmp_path / "missing.pth", "--train-root", good) == 2
    assert "not found" in capsys.readouterr().err
