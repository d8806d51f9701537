from soco_d2.data import loader


def test_workers_are_capped_to_the_usable_cores_with_one_log_line(monkeypatch, soco_log):
    monkeypatch.setattr(loader.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(loader, "_capped_logged", set())
    assert loader.usable_num_workers(8) == 2
    assert loader.usable_num_workers(8) == 2
    assert loader.usable_num_workers(2) == 2 and loader.usable_num_workers(0) == 0
    assert soco_log == ["DATALOADER.NUM_WORKERS 8 is more than the 2 usable core(s) of this "
                     "process; using 2 loader workers."]
    # Cores are shared by the processes of the machine.
    monkeypatch.setattr(loader.comm, "get_local_world_size", lambda: 2)
    assert loader.usable_num_workers(8) == 1
