import json

from soco_d2.engine.writers import build_writers, format_progress_line


def test_progress_line_format():
    m = {"total_loss": 1.2345, "loss_v1_v2": 0.6, "loss_v1_v3": 0.6345, "lr": 0.08,
         "momentum": 0.990012, "data_time": 0.0123, "iter_time": 0.52, "images_per_sec": 245.12,
         "num_skipped": 0, "eta_seconds": 32462.9}
    assert format_progress_line(120, 62500, m) == (
        "iter 120/62500  loss 1.2345 (loss_v1_v2 0.6 loss_v1_v3 0.6345)  lr 0.0800  m 0.99001  "
        "data 0.012s  iter 0.520s  245.1 img/s  ETA 9:01:02"
    )


def test_writers_write_json_lines_and_tensorboard(tmp_path):
    writers = build_writers(str(tmp_path), 10)
    for it in (2, 4):
        for w in writers:
            w.write(it, {"total_loss": 1.0 / it, "lr": 0.1})
    for w in writers:
        w.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.json").read_text().splitlines()]
    assert lines == [{"iteration": 2, "total_loss": 0.5, "lr": 0.1},
                     {"iteration": 4, "total_loss": 0.25, "lr": 0.1}]
    assert list(tmp_path.glob("events.out.tfevents.*"))


def test_every_log_line_carries_its_level(tmp_path):
    import logging

    from soco_d2.engine.writers import setup_logging

    log = setup_logging(str(tmp_path), name="soco_d2_test_levels")
    log.info("an ordinary line")
    log.warning("something to act on")
    for h in log.handlers:
        h.flush()
    lines = (tmp_path / "log.txt").read_text().splitlines()
    assert " INFO soco_d2_test_levels]: an ordinary line" in lines[0]
    assert " WARNING soco_d2_test_levels]: something to act on" in lines[1]
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    logging.getLogger("soco_d2_test_levels")._soco_configured = False
