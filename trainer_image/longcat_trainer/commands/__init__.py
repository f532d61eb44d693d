"""The commands of `longcat-i2v` that train or sample, on this machine (the CLI imports them only when they run).

run.py       `longcat-i2v run JOB.yaml`: preflight, then the trainer under torchrun, with a progress view
terminal.py  how a run shows itself: a progress bar on a terminal, periodic lines in a log
demo.py      `longcat-i2v demo`: a tiny dataset, model and job, run on the CPU
sample.py    `longcat-i2v sample`: one image-to-video preview MP4 from a start frame and a prompt
"""
