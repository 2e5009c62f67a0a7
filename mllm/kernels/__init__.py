"""Optional fast kernels for the GPU path, shared by the torch and Transformer Engine backends.

Everything here is optional: importing ``mllm.kernels`` needs only torch. Each feature checks its own package
(flash-attn, torchao, transformer_engine, Triton) when asked for and fails with a one-line error naming the
package and the extra to install (``mllm.kernels.deps``).

- ``flex_attention``: packed-row attention through FlexAttention with a document/causal block mask.
- ``flash_attention``: packed-row attention through flash-attn's ``flash_attn_varlen_func``.
- ``auto``: picks the best attention kernel available on the tensors' device.
- ``fp8``: torchao float8 training on the model's linears (and the parallel linears' local shards).
- ``padding``: exact row padding so FP8 GEMMs see token counts that are multiples of 16.
- ``compile``: ``torch.compile`` of whole blocks; ``optim``: fused AdamW.
"""
