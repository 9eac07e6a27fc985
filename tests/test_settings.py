"""One vocabulary: a setting declared once (`finetune.settings.setting`) becomes a flag of
train and compare, is recorded in run.json and results.json, is kept by a resume and checked by
compare's --resume; `--print-config` writes a command line as a `--config` file that reads back
to the same settings; `finetune compare` and `python -m benchmarks.compare` are one command."""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import pytest

import finetune.train.config as config_module
from finetune import Trainer
from finetune.cli import build_parser, main
from finetune.compare import run as compare_run
from finetune.data.config import DataConfig
from finetune.settings import positive_int, setting
from finetune.train.config import TrainConfig
from tests.conftest import TINY, make_tree
from tests.test_compare import Factory, argv, read_results


@attrs.frozen(kw_only=True)
class WithDummy(TrainConfig):
    """TrainConfig with one more setting, declared as every setting is."""

    dummy: int = setting(3, flag="--dummy", parse=positive_int, help="a setting under test")


@pytest.fixture
def dummy_setting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Declare `dummy` (the only change a new setting needs besides its use) and record the
    value every fit trains with (its use)."""
    monkeypatch.setattr(config_module, "SETTING_CLASSES", (DataConfig, WithDummy))
    seen: list[int] = []
    fit = Trainer.fit

    def recording_fit(self: Trainer, *args, **kwargs):
        seen.append(self.config.dummy)
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "fit", recording_fit)
    return seen


def train_argv(data: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--backbone", TINY, "--epochs", "1", "--batch-size",
            "4", "--image-size", "32", "--workers", "0", "--device", "cpu", "--precision",
            "fp32", "--strategy", "last-layer", *extra]


def test_a_new_setting_is_a_flag_a_record_and_kept_on_resume(
        dummy_setting: list[int], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = make_tree(tmp_path / "data")
    run = tmp_path / "run"
    assert main(train_argv(data, "--dummy", "7", "--checkpoint-dir", str(run))) == 0
    assert json.loads((run / "run.json").read_text())["cli"]["dummy"] == 7
    assert main(["train", "--resume", str(run), "--backbone", TINY, "--epochs", "2"]) == 0
    assert dummy_setting == [7, 7]
    from finetune.cli.main import subcommand_parser

    assert "--dummy" in subcommand_parser(build_parser(), "train").format_help()


def test_a_new_setting_is_a_compare_flag_and_a_resume_must_keep_it(
        dummy_setting: list[int], tmp_path: Path) -> None:
    tree, out = make_tree(tmp_path / "data"), tmp_path / "compare"
    args = argv(tree, out, "--strategies", "last-layer")
    assert compare_run.main([*args, "--dummy", "5"], backbone_factory=Factory()) == 0
    assert read_results(out)["config"]["dummy"] == 5 and dummy_setting == [5]
    with pytest.raises(SystemExit, match=r"dummy: 5 -> 6"):
        compare_run.main([*args, "--dummy", "6", "--resume"], backbone_factory=Factory())


def test_print_config_reads_back_as_the_same_command_line(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    typed = train_argv(tmp_path, "--ema", "0.9", "--crop-scale", "0.5", "--augment", "trivial",
                       "--strategy", "freeze-fraction:fraction=0.5:count=numel",
                       "--max-grad-norm", "1.5", "--warmup", "0.1", "--lr", "3e-4")
    assert main([*typed, "--print-config"]) == 0
    written = capsys.readouterr().out
    assert "ema_decay: 0.9" in written and "crop_scale:\n- 0.5\n- 1.0" in written
    config_file = tmp_path / "train.yaml"
    config_file.write_text(written)
    parser = build_parser()
    from_flags = vars(parser.parse_args(typed))
    main(["train", "--config", str(config_file), "--print-config"])
    assert capsys.readouterr().out == written  # the file alone says the same
    from finetune.cli.main import subcommand_parser
    from finetune.settings import apply_config_file

    parser = build_parser()
    apply_config_file(subcommand_parser(parser, "train"), config_file)
    from_file = vars(parser.parse_args(["train"]))
    ignored = {"config", "print_config", "handler", "parser"}
    assert {k: v for k, v in from_file.items() if k not in ignored} == {
        k: v for k, v in from_flags.items() if k not in ignored}


def test_a_flag_typed_beside_a_config_file_wins(tmp_path: Path) -> None:
    config_file = tmp_path / "c.yaml"
    config_file.write_text("epochs: 9\nema_decay: 0.99\nbalance: loss\n")
    parser = build_parser()
    from finetune.cli.main import subcommand_parser
    from finetune.settings import apply_config_file

    apply_config_file(subcommand_parser(parser, "train"), config_file)
    args = parser.parse_args(["train", "--epochs", "2"])
    assert (args.epochs, args.ema_decay, args.balance) == (2, 0.99, "loss")


@pytest.mark.parametrize(("text", "message"), [
    ("epoch: 3\n", "'epoch' is no setting of this command (did you mean epochs?)"),
    ("epochs: -1\n", "epochs: expected a positive integer, got -1"),
    ("balance: both\n", "balance: 'both' is not one of none, sampler, loss"),
    ("- 1\n- 2\n", "expected a mapping of setting: value"),
])
def test_a_bad_config_file_is_one_line_naming_the_key(
        text: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config_file = tmp_path / "bad.yaml"
    config_file.write_text(text)
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--config", str(config_file)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and str(config_file) in err


def test_compare_takes_a_config_file_and_prints_its_own(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["compare", "--epochs", "2", "--ema", "0.9", "--strategies",
                 "last-layer,bitfit", "--print-config"]) == 0
    written = capsys.readouterr().out
    assert "ema_decay: 0.9" in written and "strategies:\n- last-layer,bitfit" in written
    config_file = tmp_path / "compare.yaml"
    config_file.write_text(written)
    args = compare_run.parse_args(["--config", str(config_file)])
    assert (args.epochs, args.ema_decay, args.strategies) == (2, 0.9, ["last-layer,bitfit"])


def test_an_older_run_json_resumes_under_the_names_it_used(
        dummy_setting: list[int], tmp_path: Path) -> None:
    """run.json written before the vocabulary held `ema` and `accumulate` (the flags' names):
    a resume reads them as `ema_decay` and `accumulate_steps`."""
    data, run = make_tree(tmp_path / "data"), tmp_path / "run"
    assert main(train_argv(data, "--checkpoint-dir", str(run), "--ema", "0.9",
                           "--accumulate", "2")) == 0
    record = json.loads((run / "run.json").read_text())
    cli = record["cli"]
    cli["ema"], cli["accumulate"] = cli.pop("ema_decay"), cli.pop("accumulate_steps")
    (run / "run.json").write_text(json.dumps(record))
    parser = build_parser()
    args = parser.parse_args(["train", "--resume", str(run), "--backbone", TINY])
    from finetune.cli.main import take_run_settings

    take_run_settings(args)
    assert (args.ema_decay, args.accumulate_steps) == (0.9, 2)


def test_finetune_compare_and_benchmarks_compare_write_the_same_results(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tree = make_tree(tmp_path / "data")
    common = ["--data", str(tree), "--backbone", TINY, "--epochs", "1", "--batch-size", "4",
              "--image-size", "32", "--workers", "0", "--precision", "fp32", "--device", "cpu",
              "--jobs", "1", "--tune", "none", "--strategies", "last-layer"]
    from benchmarks.compare import main as benchmarks_main

    for entry, folder in ((lambda a: main(["compare", *a]), "a"), (benchmarks_main, "b")):
        (tmp_path / folder).mkdir()
        monkeypatch.chdir(tmp_path / folder)  # the same --output, in two places
        assert entry([*common, "--output", "out"]) == 0
    a, b = read_results(tmp_path / "a" / "out"), read_results(tmp_path / "b" / "out")
    assert a["config"] == b["config"]  # the command included: one spelling
    timed = {"seconds_per_epoch", "train_seconds_per_epoch", "images_per_second",
             "peak_memory_mib", "history", "config"}
    assert [{k: v for k, v in row.items() if k not in timed} for row in a["rows"]] == [
        {k: v for k, v in row.items() if k not in timed} for row in b["rows"]]
    assert a["rows"][0]["test_predictions"] == b["rows"][0]["test_predictions"]


def test_every_registered_strategy_spells_a_spec_that_reads_back() -> None:
    import finetune

    needed = {"freeze-all-but": ":groups=layer3+layer4"}  # a required option
    for name in [*finetune.STRATEGIES, *finetune.PRESETS]:
        strategy = finetune.parse_strategy(name + needed.get(name, ""))
        assert finetune.parse_strategy(strategy.spec()) == strategy, name
    odd = finetune.parse_strategy("freeze-all-but:groups=layer3+layer4:train_bn=true")
    assert finetune.parse_strategy(odd.spec()) == odd and "train_bn=true" in odd.spec()
