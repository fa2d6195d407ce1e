"""The weight room: how a decoder's weights are stored and multiplied on this machine — GGUF reading, quantized
linears, the per-CPU and per-batch-size kernel plan, dense prepacking. Decoders (`server/model/llama.py`, ...) ask for
linears here and never see a block layout."""
