import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from soco_d2.utils import comm

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
                 "SLURM_NTASKS")

SCRIPT = textwrap.dedent('''
    import json, os, sys
    import torch
    from soco_d2.engine.launch import launch
    from soco_d2.utils import comm

    def main(out_dir):
        rank = comm.get_rank()
        x = torch.full((2, 3), float(rank)) + torch.arange(3.0)
        info = {
            "rank": rank, "world": comm.get_world_size(), "local_rank": comm.get_local_rank(),
            "main": comm.is_main_process(),
            "gathered": comm.all_gather(x).tolist(),
            "mean": comm.all_reduce_mean({"a": 2.0 * rank, "b": torch.tensor(1.0)}),
            "sum": comm.all_reduce_sum(torch.tensor([rank + 1.0])).tolist(),
            "objects": comm.all_gather_object({"r": rank}),
        }
        comm.synchronize()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(info, f)

    if __name__ == "__main__":
        launch(main, num_gpus_per_machine=2, backend="gloo", args=(sys.argv[1],))
''')


def test_single_process_fallbacks():
    assert comm.get_world_size() == 1 and comm.get_rank() == 0 and comm.get_local_rank() == 0
    assert comm.is_main_process()
    comm.synchronize()
    x = torch.arange(4.0).reshape(2, 2)
    assert torch.equal(comm.all_gather(x), x)
    assert comm.all_reduce_mean({"b": torch.tensor(2.0), "a": 1}) == {"a": 1.0, "b": 2.0}
    assert comm.all_gather_object("x") == ["x"]


@pytest.mark.slow
def test_collectives_on_two_gloo_processes(tmp_path):
    script = tmp_path / "collectives.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    subprocess.run([sys.executable, str(script), str(tmp_path)], check=True, env=env, timeout=300)
    infos = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, info in enumerate(infos):
        assert info["rank"] == info["local_rank"] == r and info["world"] == 2
        assert info["main"] == (r == 0)
        # rank order: rank 0's rows, then rank 1's
        assert info["gathered"] == [[0.0, 1.0, 2.0]] * 2 + [[1.0, 2.0, 3.0]] * 2
        assert info["mean"] == {"a": 1.0, "b": 1.0}
        assert info["sum"] == [3.0]
        assert info["objects"] == [{"r": 0}, {"r": 1}]
