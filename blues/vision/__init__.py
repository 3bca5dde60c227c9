"""Images in, text out: the vision side of a vision-language Blues.

    config.py   VisionConfig (the `vision` part of BluesConfig) and num_image_tokens; imports no torch
    encoder.py  VisionEncoder (ViT patch encoder), Projector (2x2 merge + 2-layer MLP to n_embd)
    tower.py    VisionTower: encoder (Blues' ViT or a pretrained one), projector, modality embedding; where image
                tokens enter the text sequence
    pretrained.py  PretrainedEncoder: a CLIP / SigLIP tower from a local Hugging Face folder (vision_pretrained);
                read_vision_config, load_vision_pretrained
    images.py   to_pixels: PIL images, HxWx3 uint8 arrays or (3, H, W) tensors -> (3, S, S) floats in [0, 1]

Nothing is imported here: `blues.config` imports `blues.vision.config`, and `import blues` must
stay free of torch.
"""
