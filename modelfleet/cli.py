"""The `modelfleet` command line: validate manifests, print the CRD, serve a model, run the operator."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from modelfleet import __version__

# Commands that live next to the code they drive; each module has register(subparsers).
_COMMAND_MODULES = (
    "modelfleet.serving.command",
    "modelfleet.operator.command",
)


def _validate(args: argparse.Namespace) -> int:
    from modelfleet.api import ManifestError, load_manifest

    failed = 0
    for path in args.file:
        try:
            md = load_manifest(path)
        except ManifestError as err:
            failed += 1
            for problem in err.problems:
                print(f"{path}: {problem}", file=sys.stderr)
            continue
        if not args.quiet:
            spec = md.spec
            print(
                f"{path}: valid ModelDeployment {md.namespace}/{md.name} "
                f"(model {spec.model.uri}, TP {spec.engine.tensor_parallel_size}, "
                f"replicas {spec.replicas})"
            )
    if failed:
        noun = "file" if failed == 1 else "files"
        print(f"{failed} of {len(args.file)} {noun} invalid", file=sys.stderr)
    return 1 if failed else 0


def _crd(args: argparse.Namespace) -> int:
    from modelfleet.api.crd import crd_yaml

    sys.stdout.write(crd_yaml())
    return 0


def _reference(args: argparse.Namespace) -> int:
    from modelfleet.api.reference import reference_markdown

    sys.stdout.write(reference_markdown())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modelfleet",
        description="Serve open-weight language models: on Kubernetes with the operator, "
        "or on this machine with `modelfleet serve`.",
        epilog="Run `modelfleet COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"modelfleet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    validate = sub.add_parser(
        "validate",
        help="check ModelDeployment manifests",
        description="Check ModelDeployment manifests without a cluster. Prints every problem "
        "with its file and field path; exits 1 when any file is invalid.",
    )
    validate.add_argument(
        "-f",
        "--file",
        action="append",
        required=True,
        metavar="FILE",
        help="manifest to check (repeat for several)",
    )
    validate.add_argument("-q", "--quiet", action="store_true", help="print only problems")
    validate.set_defaults(func=_validate)

    crd = sub.add_parser(
        "crd",
        help="print the ModelDeployment CustomResourceDefinition",
        description="Print the CRD YAML generated from the Python spec "
        "(the same as crds/ in the repository): `modelfleet crd | kubectl apply -f -`.",
    )
    crd.set_defaults(func=_crd)

    reference = sub.add_parser(
        "reference",
        help="print the manifest field reference (Markdown)",
        description="Print every ModelDeployment field with its type, default and meaning.",
    )
    reference.set_defaults(func=_reference)

    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `modelfleet plan ... | head`
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the interpreter's flush at exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
