"""`longcat-i2v serve`: the job browser and the LoRA preview, a Starlette app (app.py).

Torch-free except preview_worker.py, which alone imports the trainer (pyproject.toml's import contracts).
Every object a page shows is streamed through the server from the job's output location (objects.py): no
credential and no signed URL reaches the browser.
"""
