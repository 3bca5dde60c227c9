"""Images in, text out: the vision side of a vision-language Blues.

    config.py   VisionConfig (the `vision` part of BluesConfig) and num_image_tokens; imports no torch
    encoder.py  VisionEncoder (ViT patch encoder), Projector (2x2 merge + 2-layer MLP to n_embd)
    images.py   to_pixels: PIL images, HxWx3 uint8 arrays or (3, H, W) tensors -> (3, S, S) floats in [0, 1]

Nothing is imported here: `blues.config` imports `blues.vision.config`, and `import blues` must
stay free of torch.
"""
