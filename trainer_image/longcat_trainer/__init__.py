"""The LongCat-Video image-to-video LoRA trainer that runs in each training pod."""
