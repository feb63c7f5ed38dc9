"""model-opt plugin: causal language models converted to GGUF and quantized by llama.cpp, run in llama.cpp."""
