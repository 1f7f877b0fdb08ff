"""`fairseq-train --user-dir user_dir --task rmt_lm --arch rmt_tiny --help` lists the plugin's flags.

fairseq 0.12's `options.parse_args_and_arch` parses the command line once with the base parser, and only then
adds the arguments of the chosen --arch, --task, --criterion, --optimizer ... for a second parse. `--help` is
handled by argparse during the first parse, so it printed none of them (`--mem-tokens`, `--bptt-unroll`,
`--tokens-per-sample`, `--checkpoint-segments` ...). `install()` (run when the plugin is imported, which fairseq
does before that first parse) makes `-h`/`--help` on a fairseq parser first add those arguments, exactly as
fairseq's own second pass does (by running `parse_args_and_arch` on the same parser without `--help`), then
print the help. Every fairseq CLI that takes `--user-dir` gets it (fairseq-train, -validate, -eval-lm,
-interactive, rmt-deepspeed-train); other argparse parsers are untouched.
"""

import argparse
import contextlib
import io
import re
import sys

_state = {"installed": False}


def _is_fairseq_parser(parser: argparse.ArgumentParser) -> bool:
    options = parser._option_string_actions
    return "--user-dir" in options and "--task" in options and not getattr(parser, "_rmt_help_expanded", False)


def _add_chosen_components_args(parser: argparse.ArgumentParser, argv: list) -> None:
    from fairseq import options

    parser._rmt_help_expanded = True
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            options.parse_args_and_arch(parser, input_args=argv, parse_known=True)
    except (SystemExit, Exception):
        # e.g. the positional data directory is missing from a `--help` line: fairseq has already added every
        # group to the parser by then (the error comes from its second parse), which is all --help needs
        pass
    parser.formatter_class = _DefaultsShown  # "(default: ...)" after every flag that has one
    for action in parser._actions:  # a literal "%" in a help string ("reaches P%") would break argparse's format
        if action.help and action.help is not argparse.SUPPRESS:
            action.help = re.sub(r"%([%(])?", lambda m: m.group(0) if m.group(1) else "%%", action.help)
    _show_architecture_values(parser, argv)


class _DefaultsShown(argparse.HelpFormatter):
    """argparse's ArgumentDefaultsHelpFormatter, without "(default: None)" / "(default: False)" and without a second
    default where the help already says what the default is."""

    def _get_help_string(self, action):
        help = action.help or ""
        if "%(default)" in help or "default" in help.lower() or action.default in (None, False, argparse.SUPPRESS) \
                or not action.option_strings:
            return help
        return help + " (default: %(default)s)"


def _show_architecture_values(parser: argparse.ArgumentParser, argv: list) -> None:
    """Model flags have no parser default (fairseq suppresses them so the --arch preset fills them in), nor have the
    task flags a preset sets (rmt_lm's --tokens-per-sample): show the value the chosen preset gives each one."""
    from fairseq.models import ARCH_CONFIG_REGISTRY

    only_arch = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    only_arch.add_argument("--arch", "-a")
    only_arch.add_argument("--task")
    known = only_arch.parse_known_args(argv)[0]
    arch = known.arch
    if arch not in ARCH_CONFIG_REGISTRY:
        return
    preset = argparse.Namespace(task=known.task)
    try:
        ARCH_CONFIG_REGISTRY[arch](preset)
    except Exception:
        return
    for action in parser._actions:
        if action.default in (argparse.SUPPRESS, None) and action.dest in vars(preset) and action.dest != "task" \
                and getattr(preset, action.dest) is not None and action.help:
            value = str(getattr(preset, action.dest)).replace("%", "%%")
            action.help = f"{action.help} (--arch {arch}: {value})"


def install() -> None:
    if _state["installed"]:
        return
    _state["installed"] = True
    original = argparse._HelpAction.__call__

    def __call__(self, parser, namespace, values, option_string=None):
        if _is_fairseq_parser(parser):
            argv = [a for a in sys.argv[1:] if a not in ("-h", "--help")]
            _add_chosen_components_args(parser, argv)
        return original(self, parser, namespace, values, option_string)

    argparse._HelpAction.__call__ = __call__
