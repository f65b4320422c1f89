"""Names the command line needs before anything heavy is imported (kept free of torch and timm imports)."""

BUNDLED_BACKBONE = "autopeft_tiny_vit"  # the tiny ViT shipped in autopeft/bundled, registered with timm there
DEFAULT_BACKBONE = BUNDLED_BACKBONE  # offline and small: the default of `train`, `search` and the tests
