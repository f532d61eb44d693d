"""The job contract that the operator and the trainer both import: torch-free and kopf-free.

api.py              the LongCatI2VJob API: spec and status models (the CRD is generated from them)
rules.py            validation rules, each with its CEL expression and its Python check
parse.py            job documents (YAML/JSON) -> a LongCatI2VJob, or errors that name their field paths
simpletuner.py      SimpleTuner's config.json + multidatabackend.json -> a job document
storage.py          one interface over S3 prefixes and local directories
s3.py               the one S3 client configuration, retry budgets, credentials, access errors
pairing.py          clips paired with start frames and captions by file stem
preflight.py        listing, pairing and checking a job's datasets before any GPU is asked for
sample_manifest.py  manifest.json: the frozen samples a job trains on
progress.py         progress.json: what the trainer reports and the operator mirrors
failures.py         why a job stopped: reasons, the trainer's exit codes, classify(exception)
"""
