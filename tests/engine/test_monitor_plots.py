from soco_d2.engine.monitor_plots import plot_monitor_curves


def test_a_panel_per_kind_of_figure_and_no_file_without_any(tmp_path):
    rows = [{"iteration": i, "total_loss": 2.0 / i, "loss_a": 1.0 / i, "knn_res5_top1": 10.0 * i,
             "rankme": 3.0 + i, "emb_std": 0.1} for i in range(1, 4)]
    plot_monitor_curves(rows, str(tmp_path / "curves.png"), emb_dim=64)
    from PIL import Image

    width, height = Image.open(tmp_path / "curves.png").size
    assert (width, height) == (4 * 450, 400)  # losses, kNN, RankMe, std: 4.5 x 4 inches each
    plot_monitor_curves([{"iteration": 1, "lr": 0.1}], str(tmp_path / "none.png"))
    assert not (tmp_path / "none.png").exists()
