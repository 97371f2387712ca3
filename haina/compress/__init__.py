"""Compression: `haina compress quantize` (int8 and int4 weights) and `haina compress prune`.

Every compressed checkpoint is a checkpoint: it loads through `haina.model.checkpoint.load_model`, so
generate, chat, serve and eval use it unchanged. The layers it is made of live in `haina.model` (a
quantized checkpoint's integer Linears are `haina.model.quant`); this stage holds the commands that make
them.
"""
