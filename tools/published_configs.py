"""config.json values of published models, for the benchmarks under tools/ (no hub here): one home, read by
bench_memory.py and sim_cuda.py. Plain data: importing it imports nothing (sim_cuda.py must load its extension
before torch)."""

# Dense models (from their model cards). Llama-1 7B (the QLoRA paper's) has
# Llama-2-7B's shapes.
CONFIGS = {
    "llama-2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False,
                       max_position_embeddings=4096, rms_norm_eps=1e-5),
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
                       max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False,
                       max_position_embeddings=32768, rms_norm_eps=1e-5, sliding_window=None),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
                       max_position_embeddings=32768, rms_norm_eps=1e-6),
    "mistral-7b-v0.3": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=8, vocab_size=32768,
                            tie_word_embeddings=False, max_position_embeddings=32768, rms_norm_eps=1e-5,
                            sliding_window=None),
    "llama-1b-synthetic": dict(model_type="llama", hidden_size=2048, intermediate_size=4096, num_hidden_layers=24,
                               num_attention_heads=16, num_key_value_heads=16, vocab_size=32000,
                               tie_word_embeddings=False),  # LlamaConfig() with these sizes (fsdp_qlora notebook)
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                         max_position_embeddings=8192, rms_norm_eps=1e-5),
    "flan-t5-base": dict(model_type="t5", d_model=768, d_ff=2048, d_kv=64, num_layers=12, num_decoder_layers=12,
                         num_heads=12, vocab_size=32128, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                         dropout_rate=0.1, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1),
    "flan-t5-large": dict(model_type="t5", d_model=1024, d_ff=2816, d_kv=64, num_layers=24, num_decoder_layers=24,
                          num_heads=16, vocab_size=32128, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                          dropout_rate=0.1, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1),
}
# Fused 3-D experts, which bitsandbytes leaves 16-bit: simulated in 4-bit through qlora_lite/experts4bit.py when it
# exists (issue 17), listed as pending otherwise. Parameters: Mixtral-8x7B 46.7B, Qwen3-30B-A3B 30.5B.
MOE_CONFIGS = {
    "mixtral-8x7b": dict(model_type="mixtral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, num_local_experts=8,
                         num_experts_per_tok=2, max_position_embeddings=32768, rms_norm_eps=1e-5,
                         sliding_window=None, tie_word_embeddings=False),
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                          num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          vocab_size=151936, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                          max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=False),
}
