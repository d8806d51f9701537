import pytest

from soco_d2.engine.arguments import default_argument_parser


def test_options_and_overrides():
    args = default_argument_parser().parse_args(
        ["--config-file", "a.yaml", "--resume", "OUTPUT_DIR", "out", "SEED", "3"])
    assert args.resume and args.opts == ["OUTPUT_DIR", "out", "SEED", "3"]


@pytest.mark.parametrize("argv, flag", [
    (["--config-file", "a.yaml", "OUTPUT_DIR", "out", "--resume"], "--resume"),
    (["OUTPUT_DIR", "--num-gpus", "2", "out"], "--num-gpus"),
    (["SEED", "1", "--config-file=a.yaml"], "--config-file"),
])
def test_an_option_among_the_overrides_is_named(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        default_argument_parser().parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"option {flag} appears among the KEY VALUE overrides" in err
    assert "options go before them" in err


def test_values_that_look_like_options_but_are_not_stay_overrides():
    args = default_argument_parser().parse_args(["OUTPUT_DIR", "--out"])
    assert args.opts == ["OUTPUT_DIR", "--out"]
