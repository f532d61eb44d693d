"""The controller: kopf handlers that read, decide and apply, and the `longcat-i2v` CLI.

reconcile.py  the kopf handlers: each pass is read.py -> decide.py -> apply.py
read.py       what a pass observes: the job, its attempts' Jobs and pods, progress.json; preflight at launch
decide.py     pure: (spec, status, observed) -> the next status and the actions
apply.py      the status written (conditionally on the version read), then the actions
status.py     every status transition, on the typed JobStatus
gang.py       the Kubernetes objects of a gang: ConfigMap, headless Service, Indexed Job running torchrun
kube.py       the few Kubernetes API calls; metrics.py, settings.py, crd.py (CRD from the API models)
cli.py        `longcat-i2v`; run, demo and sample are the trainer's (imported only when they run)
"""
