"""Shared Triton building blocks (imported only by the Triton backends, never at package
import): `math` (log-domain arithmetic and the online-softmax step), `tiles` (tile and
warp sizing) and `rows` (the per-row gradient rescale)."""
