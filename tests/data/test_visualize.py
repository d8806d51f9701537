import numpy as np
import pytest

from soco_d2.config import get_cfg
from soco_d2.data.soco_views import SoCoViewMapper
from soco_d2.data.visualize import FILTERED, KEPT, _patch_grid, box_colour, box_pixels, draw_boxes, soco_sheet

SQUARE = (40, 40, 120, 120)  # x1, y1, x2, y2 of the white square in a 160 x 160 image


def _mapper(**kv):
    cfg = get_cfg()
    cfg.merge_from_list([
        "INPUT.SOCO.VIEW1_SIZE", 96, "INPUT.SOCO.VIEW2_SIZE", 64, "INPUT.SOCO.VIEW3_SIZE", 32,
        "INPUT.SOCO.VIEW4_SIZE", 48, "INPUT.SOCO.NUM_PROPOSALS", 1, "INPUT.SOCO.JITTER_PROB", 0.0,
        "INPUT.SOCO.COLOR_JITTER_PROB", 0.0, "INPUT.SOCO.GRAYSCALE_PROB", 0.0,
        "INPUT.SOCO.BLUR_PROB", (0.0, 0.0), "INPUT.SOCO.SOLARIZE_PROB", (0.0, 0.0),
    ] + [x for p in kv.items() for x in p])
    return SoCoViewMapper(cfg)


def _image():
    img = np.full((160, 160, 3), 30, np.uint8)
    x1, y1, x2, y2 = SQUARE
    img[y1:y2, x1:x2] = 250
    return img


def _extent(mask):
    ys, xs = np.nonzero(mask)
    return xs.min(), ys.min(), xs.max(), ys.max()


def test_box_pixels_convention():
    assert box_pixels((0, 0, 4, 4)) == (0, 0, 3, 3)  # pixels 0..3 lie inside [0, 4)
    assert box_pixels((1.4, 0.6, 3.4, 2.6)) == (1, 1, 2, 2)  # centres 1.5 and 2.5 inside
    assert box_pixels((1, 1, 3, 3), scale=2) == (2, 2, 5, 5)
    assert box_pixels((2.2, 2.2, 2.3, 2.3)) == (2, 2, 2, 2)  # at least one pixel


@pytest.mark.parametrize("seed", range(6))
def test_drawn_boxes_cover_the_pixels_of_the_proposal_in_every_view(seed):
    """The only proposal is the white square: in every view the mapper returns its box, the
    white pixels are where the box is, and the outline the sheet draws (at the sheet's scale)
    runs along them."""
    mapper = _mapper()
    sample = mapper(_image(), np.array([SQUARE], np.float32), np.random.default_rng(seed))
    sides = [("v1", p["boxes_a"]) for p in sample["pairs"]] + [(p["b"], p["boxes_b"]) for p in sample["pairs"]]
    assert {name for name, _ in sides} == {"v1", "v2", "v3", "v4"}
    for name, boxes in sides:
        view = np.ascontiguousarray(sample["images"][name].numpy().transpose(1, 2, 0))
        box = boxes.numpy()[0]
        for scale in (1, 3):
            big = np.repeat(np.repeat(view, scale, 0), scale, 1)
            drawn = draw_boxes(view, box[None], ids=[0], scale=scale, colour=(255, 0, 255), labels=False)
            outline = (drawn != big).any(-1)
            assert _extent(outline) == box_pixels(box, scale), (name, scale)
            white = big.min(-1) > 140  # the square, after resizing
            for got, want in zip(_extent(white), box_pixels(box, scale)):
                assert abs(int(got) - want) <= scale, (name, scale, _extent(white), box)


def test_soco_sheet_has_a_panel_per_view_and_colours_ids():
    mapper = _mapper(**{"INPUT.SOCO.NUM_PROPOSALS": 2, "INPUT.SOCO.MIN_BOX_SIZE": 2.0})
    props = np.array([SQUARE, (0, 0, 80, 80), (2, 2, 3, 3)], np.float32)  # the last: 1 px wide
    sample = mapper(_image(), props, np.random.default_rng(0))
    sheet = soco_sheet(_image(), props, np.array([[0, 0, 10, 10]], np.float32), sample,
                       min_box_size=2.0, panel=96)
    # proposals 96, V1 96 (x1), V2 64 (x1), V3 32 (x3), V4 48 (x2), 4 gaps of 6
    assert sheet.dtype == np.uint8 and sheet.shape[1] == 96 + 96 + 64 + 96 + 96 + 4 * 6

    def has(colour):
        return bool((sheet == np.array(colour, np.uint8)).all(-1).any())

    assert has(KEPT) and has(FILTERED)  # the 1-px box is unusable: drawn as filtered
    ids = {int(i) for p in sample["pairs"] for i in p["ids_b"]}
    assert ids <= {0, 1} and all(has(box_colour(i)) for i in ids)


def test_patch_grid_puts_patch_j_at_its_cell():
    perm = np.array([5, 0, 8, 1, 3, 7, 2, 6, 4])
    patches = np.stack([np.full((8, 8, 3), 10 * (j + 1), np.uint8) for j in range(9)])
    board = _patch_grid(patches, perm, [""] * 9, 3, 2)
    p = 16 + 3
    for j, cell in enumerate(perm):
        r, c = divmod(int(cell), 3)
        assert board[r * p + 15, c * p + 15, 0] == 10 * (j + 1)
