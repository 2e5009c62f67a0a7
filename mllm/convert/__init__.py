"""Checkpoint conversion between our model and Hugging Face's InternVL formats.

CLI: ``python -m mllm.convert import-hf HF_DIR OUT_DIR`` and
``python -m mllm.convert export-hf CKPT_DIR OUT_DIR --format {internvl_chat,transformers}``.
Python: ``mllm.convert.core`` (read_checkpoint / write_hf / import_hf / export_hf) and ``mllm.hf``
(load / save a model). Per-format mappings: ``internvl_chat``, ``transformers_native``.
"""
