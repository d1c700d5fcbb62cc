"""A tiny toy-world model config shared by the toy tests (seconds to build, train and sample on a CPU)."""

from awm_jax.toy import world


def tiny_toy_config(num_layers: int = 2, dual_attention_layers=(0,)) -> dict:
    """``world.default_config()`` shrunk to width 16 (2 heads x 8), text width 16, pooled width 12."""
    cfg = world.default_config()
    cfg["transformer"].update(
        num_layers=num_layers,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_projection_dim=16,
        joint_attention_dim=16,
        pooled_projection_dim=12,
        dual_attention_layers=list(dual_attention_layers),
    )
    cfg["text"].update(dim=16, pooled_dim=12)
    return cfg
