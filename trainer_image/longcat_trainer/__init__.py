"""The LongCat-Video image-to-video LoRA trainer that runs in each training pod (and under `longcat-i2v run`).

It imports the job contract (longcat_job), never the operator. Data flow, one folder or module per stage:

    data/                 the frozen manifest read per rank (shards.py), clips and start frames decoded (video.py),
                          cached entries read into batches (entries.py, batches.py)
    cache/                latents and text embeddings: plan, fill, build across ranks
    model/                the DiT (dit.py), loading, sources, encoders, and preparing it to train (prepare.py:
                          LoRA, quantization, recomputation policy, compile, DDP/FSDP)
    train.py              the training loop; flow.py the flow-matching loss; lora.py adapters and their exports
    checkpoint.py         checkpoints in the output; distributed.py the torchrun world
    validation_videos.py  validation videos during training, sampled by denoise.py
    report.py, metrics.py progress.json and loss.png; Prometheus metrics
    commands/             `longcat-i2v run`, `demo` and `sample`
"""
