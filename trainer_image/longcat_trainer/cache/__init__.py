"""Content-addressed caches of VAE latents and text embeddings, filled by all ranks before training.

Where: each dataset's cache location (`vaeCache`, or `<output>/cache/<dataset id>/`), as SimpleTuner's
`cache_dir_vae`: clip latents in the clip dataset's cache, start-frame latents in the conditioning
dataset's (separate caches, as the seed asks), caption and negative-prompt embeddings under the clip
dataset's `text/`. A second job on the same data and model finds every entry and encodes nothing.

plan.py   cache keys and each sample's entries: pure functions of the job, the manifest and the encoders
fill.py   encoding the entries a sample lacks (the VAE and the text encoder, loaded on first use)
build.py  the caches filled across the ranks before training, and what every rank found gathered
"""
