import glob
import os

import pytest

from soco_d2.config import ConfigError, get_cfg, get_finetune_cfg, is_detectron2_config, load_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_base_inheritance_and_overrides():
    cfg = load_config(
        os.path.join(REPO, "configs/soco/soco_star_fpn_r50_400ep.yaml"),
        ["SOLVER.IMS_PER_BATCH", "8", "INPUT.SOCO.CROP_SCALE", "(0.3, 1.0)"],
    )
    # from the leaf
    assert cfg.INPUT.SOCO.VIEW4_SIZE == 112 and cfg.INPUT.SOCO.VIEW3_SIZE == 192
    assert cfg.SOLVER.EPOCHS == 400
    # from the base
    assert cfg.SOLVER.LARS_TRUST_COEF == 0.001 and cfg.SOLVER.WEIGHT_DECAY == 1e-5
    # from the command line
    assert cfg.SOLVER.IMS_PER_BATCH == 8 and tuple(cfg.INPUT.SOCO.CROP_SCALE) == (0.3, 1.0)
    assert cfg.is_frozen()


def test_official_soco_values():
    cfg = load_config(os.path.join(REPO, "configs/soco/soco_fpn_r50_100ep.yaml"))
    s = cfg.SOLVER
    assert (s.OPTIMIZER, s.BASE_LR, s.BASE_LR_BATCH_SIZE, s.IMS_PER_BATCH) == ("LARS", 1.0, 256, 2048)
    assert (s.WARMUP_EPOCHS, s.EPOCHS, s.EXCLUDE_BIAS_AND_NORM) == (10, 100, True)
    assert cfg.MODEL.EMA.BASE_MOMENTUM == 0.99 and cfg.MODEL.EMA.SCHEDULE == "cosine"
    assert cfg.INPUT.SOCO.NUM_PROPOSALS == 4 and cfg.INPUT.SOCO.CUTOUT
    assert not load_config(os.path.join(REPO, "configs/soco/soco_fpn_r50_400ep.yaml")).INPUT.SOCO.CUTOUT


def test_unknown_key_in_override_names_the_key():
    with pytest.raises(ConfigError, match="SOLVER.MAX_ITERS"):
        load_config("", ["SOLVER.MAX_ITERS", "3"])


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("SOLVER:\n  LR: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(f))
    assert "bad.yaml" in str(e.value) and "SOLVER.LR" in str(e.value)


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match="SOLVER.MAX_ITER"):
        load_config("", ["SOLVER.MAX_ITER", "abc"])


def test_odd_overrides_and_missing_file():
    with pytest.raises(ConfigError, match="pairs"):
        load_config("", ["SOLVER.MAX_ITER"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/no/such/config.yaml")


def test_bad_values_rejected():
    with pytest.raises(ConfigError, match="RESNETS.DEPTH"):
        load_config("", ["MODEL.RESNETS.DEPTH", "42"])
    with pytest.raises(ConfigError, match="AMP.DTYPE"):
        load_config("", ["SOLVER.AMP.DTYPE", "float8"])


def test_every_yaml_under_configs_uses_known_keys():
    """Every project config (all but detectron2's own format) loads with our defaults."""
    files = [
        f
        for f in glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True)
        if os.sep + "detectron2" + os.sep not in f
    ]
    assert files
    for f in files:
        load_config(f)


def test_get_cfg_is_a_fresh_copy():
    a = get_cfg()
    a.SOLVER.BASE_LR = 123.0
    assert get_cfg().SOLVER.BASE_LR == 1.0


def _keys(node, prefix=""):
    return {k2 for k, v in node.items()
            for k2 in (_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [prefix + k])}


def test_finetune_defaults_are_their_own():
    ft, pre = get_finetune_cfg(), get_cfg()
    s = ft.SOLVER
    assert (s.OPTIMIZER, s.LR_SCHEDULER, s.BASE_LR, s.BASE_LR_BATCH_SIZE, s.IMS_PER_BATCH) == (
        "SGD", "WarmupMultiStep", 0.02, 16, 16)
    assert (s.MAX_ITER, s.WEIGHT_DECAY, s.WARMUP_FACTOR, ft.CUDNN_BENCHMARK) == (90000, 1e-4, 0.001, False)
    assert (pre.SOLVER.OPTIMIZER, pre.SOLVER.LR_SCHEDULER) == ("LARS", "WarmupCosine")
    assert _keys(ft) == _keys(pre)  # the same keys: any config loads on either
    cfg = load_config("", ["SOLVER.MAX_ITER", "100"], defaults=get_finetune_cfg)
    assert cfg.SOLVER.OPTIMIZER == "SGD" and cfg.SOLVER.MAX_ITER == 100 and cfg.is_frozen()


FINETUNE_CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "finetune", "*.yaml"))) + [
    os.path.join(REPO, "configs", "demo", "mask_rcnn_demo.yaml")]


@pytest.mark.parametrize("path", FINETUNE_CONFIGS, ids=os.path.basename)
def test_shipped_finetune_configs_read_the_same_on_either_defaults(path):
    """They set every shared key they use, so a tool loading them on get_cfg (the quick-start
    demo) runs the recipe tools/train_net.py runs (on get_finetune_cfg)."""
    assert load_config(path, defaults=get_finetune_cfg) == load_config(path)


def test_detectron2_format_is_told_apart_from_ours():
    """tools/train_net.py picks detectron2's trainer for detectron2-format files (without
    importing detectron2); soco_d2 configs, including those that pretrain on detectron2's
    modules, stay soco_d2's and load with load_config."""
    d2 = os.path.join(REPO, "configs", "detectron2")
    theirs = glob.glob(os.path.join(d2, "*.yaml")) + glob.glob(os.path.join(d2, "pretrain", "*_d2arch.yaml"))
    ours = [f for f in glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True) if f not in theirs]
    assert len(theirs) >= 7 and any("pretrain" in f for f in ours)
    assert all(is_detectron2_config(f) for f in theirs)
    assert not any(is_detectron2_config(f) for f in ours)
    for f in ours:
        load_config(f)
    assert not is_detectron2_config("")
