"""`longcat-i2v`: the command-line tool.

validate            check job files offline with the same rules as the API server and the operator
import-simpletuner  turn SimpleTuner's config.json + multidatabackend.json into a job file
run                 train a job on this machine (GPUs, or the CPU) with the code the cluster's pods run
demo                make a tiny dataset and model, and run a job on them on the CPU (about two minutes)
sample              preview a LoRA: one image-to-video MP4 from a start frame and a prompt
serve               browse jobs (curves, validation videos, LoRA files) and preview LoRAs in a web page

run, demo and sample need the trainer's packages: pip install 'longcat-i2v[trainer]'; serve needs
'longcat-i2v[ui]' (and the trainer's packages for its preview).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from longcat_job.parse import FieldError, InvalidJob, load_documents, parse_job
from longcat_job.simpletuner import import_simpletuner


def _validate(args: argparse.Namespace) -> int:
    failed = False
    for path in args.files:
        try:
            documents = load_documents(path)
            if not documents:
                raise InvalidJob([FieldError("(document)", "the file holds no job")])
            jobs = [parse_job(document) for document in documents]
        except InvalidJob as exc:
            failed = True
            for error in exc.errors:
                print(f"{path}: {error}", file=sys.stderr)
            continue
        except OSError as exc:
            failed = True
            print(f"{path}: cannot read: {exc.strerror}", file=sys.stderr)
            continue
        for job in jobs:
            spec = job.spec
            print(
                f"{path}: valid: {job.metadata.name or '(unnamed)'}: {len(spec.datasets)} datasets, "
                f"LoRA rank {spec.lora.rank}, {spec.training.max_steps} steps, validation "
                f"{spec.validation.resolution}x{spec.validation.frames}, "
                f"{spec.resources.nodes}x{spec.resources.gpus_per_node} GPUs"
            )
    return 1 if failed else 0


def _read_json(path: Path, what: str) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SystemExit(f"{path}: {what} is not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}")
    except OSError as exc:
        raise SystemExit(f"{path}: cannot read {what}: {exc.strerror}")


def _import_simpletuner(args: argparse.Namespace) -> int:
    config = _read_json(args.config, "config.json")
    backends = _read_json(args.backend, "multidatabackend.json")
    if not isinstance(config, dict) or not isinstance(backends, list):
        raise SystemExit("config.json must be an object and multidatabackend.json a list of datasets")
    result = import_simpletuner(config, backends, name=args.name, output=args.output)
    text = yaml.safe_dump(result.job, sort_keys=False)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    for note in result.notes:
        print(f"not mapped: {note}", file=sys.stderr)
    try:
        parse_job(result.job)
    except InvalidJob as exc:
        for error in exc.errors:
            print(f"invalid: {error}", file=sys.stderr)
        return 1
    return 0


def _trainer_missing(exc: ModuleNotFoundError, command: str) -> SystemExit:
    return SystemExit(f"longcat-i2v {command}: needs the trainer's packages ({exc.name} is not installed): "
                      "pip install 'longcat-i2v[trainer]' (or scripts/setup-venv operator,trainer)")


# The commands that train or sample live in the trainer package and import it only when they run, so that
# `validate` and `import-simpletuner` work with the job contract alone.
def _run(args: argparse.Namespace) -> int:
    try:
        from longcat_trainer.commands.run import run_job  # noqa: PLC0415
    except ModuleNotFoundError as exc:
        raise _trainer_missing(exc, "run") from None
    return run_job(args.job, processes=args.gpus, cpu=args.cpu)


def _demo(args: argparse.Namespace) -> int:
    try:
        from longcat_trainer.commands.demo import run_demo  # noqa: PLC0415
    except ModuleNotFoundError as exc:
        raise _trainer_missing(exc, "demo") from None
    return run_demo(args.dir)


def _sample(args: argparse.Namespace) -> int:
    try:
        from longcat_trainer.commands.sample import main as sample_main  # noqa: PLC0415
    except ModuleNotFoundError as exc:
        raise _trainer_missing(exc, "sample") from None
    return sample_main(args.rest)


def _serve(args: argparse.Namespace) -> int:
    try:
        from longcat_ui.serve import main as serve_main  # noqa: PLC0415
    except ModuleNotFoundError as exc:
        raise SystemExit(f"longcat-i2v serve: needs the UI's packages ({exc.name} is not installed): "
                         "pip install 'longcat-i2v[ui]'") from None
    return serve_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longcat-i2v", description=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    validate = commands.add_parser("validate", help="check job files offline; exit code 1 on any error")
    validate.add_argument("files", nargs="+", type=Path, metavar="JOB.yaml")
    validate.set_defaults(handler=_validate)

    importer = commands.add_parser("import-simpletuner", help="convert SimpleTuner config files into a job file")
    importer.add_argument("--config", type=Path, required=True, help="SimpleTuner config.json")
    importer.add_argument("--backend", type=Path, required=True, help="SimpleTuner multidatabackend.json")
    importer.add_argument("--name", default="imported", help="metadata.name of the job (default: imported)")
    importer.add_argument("--output", help="output location (s3://BUCKET/PREFIX or a directory); "
                          "default: config.json's output_dir")
    importer.add_argument("-o", "--out", type=Path, help="write the job here instead of standard output")
    importer.set_defaults(handler=_import_simpletuner)

    run = commands.add_parser("run", help="train a job on this machine; Ctrl-C saves a checkpoint, run again to resume")
    run.add_argument("job", type=Path, metavar="JOB.yaml", help="local paths in it are relative to its folder")
    run.add_argument("--gpus", type=_positive, metavar="N",
                     help="processes to start: one per GPU (default: every GPU; 1 on the CPU)")
    run.add_argument("--cpu", action="store_true", help="train on the CPU even where there are GPUs")
    run.set_defaults(handler=_run)

    demo = commands.add_parser("demo", help="a tiny end-to-end job on the CPU, nothing to download")
    demo.add_argument("--dir", type=Path, default=Path("longcat-demo"),
                      help="folder for the dataset, model, job file and output (default: ./longcat-demo)")
    demo.set_defaults(handler=_demo)

    # Its own parser (longcat_trainer.denoise) reads the arguments: `longcat-i2v sample --help` lists them.
    sample = commands.add_parser("sample", help="preview a LoRA: one MP4 from a start frame and a prompt",
                                 add_help=False)
    sample.set_defaults(handler=_sample)

    # Its own parser (longcat_ui.serve) reads the arguments, as `python -m longcat_ui` in the trainer image.
    serve = commands.add_parser("serve", help="job browser and LoRA preview in a web page (local by default)",
                                add_help=False)
    serve.set_defaults(handler=_serve)
    return parser


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.handler not in (_sample, _serve):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
