"""The hourglass and GPT configurations the expert benchmarks compare: byte-level, block
512, matched parameter counts (~5 M: the hourglass has ~10% more)."""
from experts.gpt import GPTConfig
from experts.hourglass import HourglassConfig

HOURGLASS = HourglassConfig(block_size=512, group_len=32, latents=[16, 4], widths=[64, 128, 224], n_head=4,
                            n_local=1, n_global=1, n_latent_layers=4)
GPT_BASELINE = GPTConfig(block_size=512, n_layer=6, n_head=4, n_embd=256)
