"""Peri-LN: Transformers with Post-, Pre-, Peri- and Output-LN placements (Kim et al., ICML 2025); the
decoder-only language model and a ViT backbone built from the same block, as a task of the shared loop."""
from peri_ln.task import make_task

__all__ = ["make_task"]
