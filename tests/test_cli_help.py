"""The command-line help: every default it states is the flag's real default."""
import argparse
import re

from luffy_fast import cli


def _stated_defaults():
    """(command, flag, stated, actual) for each help text that says '(default: X' or 'X (the default)'."""
    subparsers = next(a for a in cli._parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command, parser in subparsers.choices.items():
        for action in parser._actions:
            help_text = action.help or ""
            stated = re.search(r"\(default: ([^;)]+)", help_text) or re.match(r"(\S+) \(the default\)",
                                                                                help_text)
            if stated and action.option_strings:
                yield command, action.option_strings[0], stated.group(1), action.default


def test_every_default_the_help_states_is_the_flags_default():
    checked = list(_stated_defaults())
    flags = {(command, flag) for command, flag, _, _ in checked}
    assert {("eval", "--n"), ("eval", "--temperature"), ("eval", "--top-p"), ("eval", "--max-new-tokens"),
            ("eval", "--engine"), ("eval", "--seed"), ("eval", "--batch-size"),
            ("eval", "--tensor-parallel-size"), ("eval", "--reward-timeout"), ("eval", "--save-every"),
            ("demo", "--output-dir"), ("demo", "--runs")} <= flags
    for command, flag, stated, actual in checked:
        if actual is None:  # worked out at run time, and said in words
            assert not re.fullmatch(r"[\d.e+-]+", stated), (command, flag, stated)
        elif isinstance(actual, float):
            assert float(stated) == actual, (command, flag, stated, actual)
        else:
            assert stated == str(actual), (command, flag, stated, actual)
