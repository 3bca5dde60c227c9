"""Hugging Face interop: import Mixtral and Qwen3-MoE folders as Blues models, export Blues models
to them, and start training from a model folder (blues-train --init_from).

    model = load_hf("path/to/mixtral", dtype=torch.bfloat16)   # the Python entry point (also from_hf)
    save_hf(model, "path/to/out")   # transformers.AutoModelForCausalLM.from_pretrained("path/to/out")

Blues.from_hf does not exist: blues.hf sits above blues.model in the import layers
(tests/test_imports.py), so load_hf is the entry point.

    families.py  each family's config.json fields and tensor names (the map is in its docstring)
    load.py      import, streamed from safetensors into a meta-device model; --init_from
    save.py      export, sharded, written whole or not at all
"""
from blues.hf.families import (
                               FAMILIES,
                               MIXTRAL,
                               QWEN3_MOE,
                               SUPPORTED_MODEL_TYPES,
                               TensorMap,
                               config_from_hf,
                               config_to_hf,
                               export_family,
                               tensor_map,
)
from blues.hf.load import folder_config, hf_weight_files, init_from_config, load_hf, load_weights_into, resolve_dtype
from blues.hf.save import save_hf

from_hf = load_hf  # the name the issue gives

__all__ = ["FAMILIES", "MIXTRAL", "QWEN3_MOE", "SUPPORTED_MODEL_TYPES", "TensorMap", "config_from_hf",
           "config_to_hf", "export_family", "tensor_map", "folder_config", "hf_weight_files", "init_from_config",
           "load_hf", "load_weights_into", "resolve_dtype", "save_hf", "from_hf"]
