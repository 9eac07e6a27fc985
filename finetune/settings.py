"""One vocabulary for every setting: each is declared once, on its config class, with its flag,
help and whether a resume must keep it; the command lines, the comparison, run.json, the resume
checks and `--config` files are derived from that declaration.

    schedule: str = setting("constant", flag="--schedule", choices=SCHEDULES,
                            help="learning rate per optimizer step ...")

A setting's name is its field's name everywhere a setting is written down (run.json's `cli`,
results.json, a `--config` YAML file); only the flag may be spelled otherwise (`--ema` sets
`ema_decay`). `formerly` lists names older files used, so they still resume.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

# the subcommands a setting's flag appears in unless its declaration names others
TRAINING_COMMANDS = frozenset({"train", "lr-find", "compare"})
METADATA_KEY = "finetune.setting"


@attrs.frozen(kw_only=True)
class Flag:
    """How a config field is set from outside: its flag, help, parser and resume rule."""

    flag: str | None  # None: set in Python only (recorded and resume-checked all the same)
    help: str = ""
    parse: Callable[[str], Any] | None = None  # an argparse `type`: converts and checks
    choices: tuple[Any, ...] | None = None
    metavar: str | None = None
    resume: bool = True  # a resume keeps the run's value; a comparison's rows must share it
    commands: frozenset[str] = TRAINING_COMMANDS
    formerly: tuple[str, ...] = ()  # names older run.json / results.json files used
    const: Any = None  # the value of the bare flag (`--augment` alone), where it takes one
    negation: tuple[str, Any] | None = None  # a second flag setting one value: --no-augment


def setting(default: Any = attrs.NOTHING, *, flag: str | None, help: str = "",
            parse: Callable[[str], Any] | None = None, choices: Sequence[Any] | None = None,
            metavar: str | None = None, resume: bool = True,
            commands: Iterable[str] = TRAINING_COMMANDS, formerly: Sequence[str] = (),
            const: Any = None, negation: tuple[str, Any] | None = None, **field: Any) -> Any:
    """An attrs field that declares a setting (`field` takes attrs.field's validator,
    converter, ...)."""
    declared = Flag(flag=flag, help=help, parse=parse,
                    choices=tuple(choices) if choices is not None else None, metavar=metavar,
                    resume=resume, commands=frozenset(commands), formerly=tuple(formerly),
                    const=const, negation=negation)
    return attrs.field(default=default, metadata={METADATA_KEY: declared}, **field)


def declared(cls: type) -> Iterator[tuple[attrs.Attribute, Flag]]:
    """Each field of the attrs class `cls` that declares a setting, with its declaration."""
    for field in attrs.fields(cls):
        if METADATA_KEY in field.metadata:
            yield field, field.metadata[METADATA_KEY]


def kept_on_resume(*classes: type) -> tuple[str, ...]:
    """The settings of `classes` a resumed run keeps (and a comparison's rows share)."""
    return tuple(field.name for cls in classes for field, flag in declared(cls) if flag.resume)


def default_of(field: attrs.Attribute) -> Any:
    default = field.default
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
        return default.factory()
    return default


def add_flags(parser: argparse.ArgumentParser, cls: type, command: str,
              defaults: Mapping[str, Any] | None = None,
              parsers: Mapping[str, Callable[[str], Any]] | None = None,
              notes: Mapping[str, str] | None = None,
              from_preset: Sequence[str] = ()) -> list[str]:
    """Add the flag of every setting of `cls` that `command` takes; returns their names.
    `defaults` and `parsers` replace a declaration's default and type for this command,
    `notes` add to its help; a name in `from_preset` defaults to None, "the preset's" (the
    comparison's presets)."""
    defaults, parsers, notes = defaults or {}, parsers or {}, notes or {}
    added = []
    for field, flag in declared(cls):
        if flag.flag is None or command not in flag.commands:
            continue
        if field.name in from_preset:
            default, shown = None, "the preset's"
        else:
            default = defaults.get(field.name, default_of(field))
            shown = _shown(default)
        text = f"{flag.help}{notes.get(field.name, '')} (default: {shown})"
        options: dict[str, Any] = {"dest": field.name, "default": default,
                                   "help": text.replace("%", "%%")}
        if isinstance(default, bool) and flag.parse is None and flag.choices is None:
            options["action"] = argparse.BooleanOptionalAction
        else:
            options.update(type=parsers.get(field.name, flag.parse), choices=flag.choices,
                           metavar=flag.metavar)
            if flag.const is not None:
                options.update(nargs="?", const=flag.const)
        parser.add_argument(flag.flag, **options)
        if flag.negation is not None:
            name, value = flag.negation
            parser.add_argument(name, dest=field.name, action="store_const", const=value,
                                help=f"the same as {flag.flag} {_shown(value)}")
        added.append(field.name)
    return added


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(f"{item:g}" if isinstance(item, float) else str(item) for item in value)
    if value is None:
        return "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def values_of(cls: type, namespace: argparse.Namespace | Mapping[str, Any]) -> dict[str, Any]:
    """The settings of `cls` found in a parsed command line (or a mapping), by field name."""
    found = vars(namespace) if isinstance(namespace, argparse.Namespace) else namespace
    names = {field.name for field, _ in declared(cls)}
    return {name: value for name, value in found.items() if name in names}


def recorded(record: Mapping[str, Any], cls: type) -> dict[str, Any]:
    """The settings of `cls` a run.json / results.json mapping holds, under today's names
    (a value under a name a setting was `formerly` known by counts as the setting's)."""
    found = {}
    for field, flag in declared(cls):
        for name in (field.name, *flag.formerly):
            if name in record:
                found[field.name] = record[name]
                break
    return found


# -- argument types: each converts and checks, naming what it expected ---------------------------
def checked_number(convert: Callable[[str], Any], accept: Callable[[Any], bool],
                   wanted: str) -> Callable[[str], Any]:
    """An argparse `type` that converts, then checks, naming what it expected either way."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got '{text}'") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {value}")
        return value

    return parse


def argument_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse `type` from a function that raises ValueError with a message."""

    def checked(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    checked.__name__ = getattr(parse, "__name__", "value")
    return checked


positive_int = checked_number(int, lambda v: v >= 1, "a positive integer")
non_negative_int = checked_number(int, lambda v: v >= 0, "an integer ≥ 0")
positive_float = checked_number(float, lambda v: math.isfinite(v) and v > 0,
                                "a finite number > 0")
non_negative_float = checked_number(float, lambda v: math.isfinite(v) and v >= 0,
                                    "a finite number >= 0")
unit_interval = checked_number(float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def optional(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """`parse`, or None for `none` (a YAML file's null and `--max-grad-norm none` alike)."""

    def checked(text: str) -> Any:
        return None if text.strip().lower() in ("none", "null", "") else parse(text)

    checked.__name__ = getattr(parse, "__name__", "value")
    return checked


# -- --config FILE and --print-config ------------------------------------------------------------
NOT_SETTINGS = {"handler", "parser", "command", "traceback", "tuned", "config", "print_config",
                "help"}


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, metavar="FILE",
                        help="read settings from this YAML file (keys: the settings' names, as "
                             "--print-config writes them); flags on the command line win")
    parser.add_argument("--print-config", action="store_true",
                        help="write this command line's settings as a --config YAML file to "
                             "standard output and exit")


def config_file_argument(argv: Sequence[str]) -> Path | None:
    """The `--config FILE` of a command line, read before the line is parsed (its values
    become the parser's defaults, so flags typed beside it win: timm's `-c`)."""
    for index, item in enumerate(argv):
        if item == "--config" and index + 1 < len(argv):
            return Path(argv[index + 1])
        if item.startswith("--config="):
            return Path(item.partition("=")[2])
    return None


def use_config_file(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """The `--config FILE` of `argv`, if any, made `parser`'s defaults before it parses."""
    path = config_file_argument(argv)
    if path is not None:
        apply_config_file(parser, path)


def apply_config_file(parser: argparse.ArgumentParser, path: Path) -> None:
    """Make the settings of a YAML file `parser`'s defaults, each checked as its flag
    checks it; an unknown key or a bad value is a usage error naming the key and the file."""
    import yaml

    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        parser.error(f"--config {path}: no such file")
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        parser.error(f"--config {path}: not a readable YAML file ({error})")
    if loaded is None:
        return
    if not isinstance(loaded, dict):
        parser.error(f"--config {path}: expected a mapping of setting: value, got "
                     f"{type(loaded).__name__}")
    actions: dict[str, argparse.Action] = {}
    for action in parser._actions:  # a setting's own flag, not its negation (--no-augment)
        if action.option_strings and action.dest not in NOT_SETTINGS:
            actions.setdefault(action.dest, action)
    values = {}
    for key, value in loaded.items():
        name = str(key).replace("-", "_").lstrip("_")
        if name not in actions:
            import difflib

            close = difflib.get_close_matches(name, list(actions), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            parser.error(f"--config {path}: {key!r} is no setting of this command{hint}; "
                         f"`{parser.prog} --print-config` lists them")
        values[name] = _checked(parser, actions[name], value, f"--config {path}: {key}")
    parser.set_defaults(**values)


def _checked(parser: argparse.ArgumentParser, action: argparse.Action, value: Any,
             where: str) -> Any:
    if value is None or (isinstance(value, bool) and action.type is None):
        return value
    if action.nargs in ("+", "*") or (isinstance(action.nargs, int) and action.nargs > 0):
        items = value if isinstance(value, (list, tuple)) else [value]
        return [_checked(parser, _one_of(action), item, where) for item in items]
    try:
        return flag_value(action, value)
    except NotAFlagValue as error:
        parser.error(f"{where}: {error.reason}")


class NotAFlagValue(ValueError):
    """A value from a file that its flag would refuse; `reason` says why, as the flag would."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def flag_value(action: argparse.Action, value: Any) -> Any:
    """`value` from a file (run.json, a --config YAML: a number, text, a list) as `action`
    takes it when typed — written as text (a list joined by commas), then converted and
    checked by the flag's own type and choices."""
    text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    try:
        checked = action.type(text) if action.type is not None else text
    except (argparse.ArgumentTypeError, ValueError, TypeError) as error:
        raise NotAFlagValue(str(error)) from None
    if action.choices is not None and checked not in action.choices:
        raise NotAFlagValue(f"{value!r} is not one of {', '.join(map(str, action.choices))}")
    return checked


def _one_of(action: argparse.Action) -> argparse.Action:
    """`action` for one of its items."""
    return argparse.Action(action.option_strings, action.dest, type=action.type,
                           choices=action.choices)


def print_config(parser: argparse.ArgumentParser, args: argparse.Namespace,
                 spell: Callable[[Any], Any] | None = None) -> None:
    """Write the settings of a parsed command line as a `--config` YAML file."""
    import yaml

    names = [a.dest for a in parser._actions if a.option_strings and a.dest not in NOT_SETTINGS]
    settings = {name: plain(getattr(args, name), spell) for name in names}
    sys.stdout.write(f"# {parser.prog} --config FILE: these settings; flags typed beside it "
                     "win\n")
    sys.stdout.write(yaml.safe_dump(settings, sort_keys=False, allow_unicode=True))


def plain(value: Any, spell: Callable[[Any], Any] | None = None) -> Any:
    """A value as YAML and JSON hold it: paths as text, tuples as lists; `spell` writes the
    rest (a strategy as its spec)."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [plain(item, spell) for item in value]
    if value is None or isinstance(value, (bool, int, float, str, list, dict)):
        return value
    return spell(value) if spell is not None else str(value)
