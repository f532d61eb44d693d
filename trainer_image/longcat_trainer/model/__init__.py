"""The LongCat-Video model stack: our DiT, and the Wan VAE, UMT5 text encoder, tokenizer and scheduler around it."""
