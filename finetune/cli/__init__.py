"""The `finetune` command: train, evaluate, advise, compare, predict, export, lr-find and
strategies (`finetune --help`). Each subcommand's module holds its arguments' use; `options`
holds the argument types and the flags several subcommands share."""

from finetune.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
