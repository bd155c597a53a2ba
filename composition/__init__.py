"""Composition: CALM cross-attention blocks and PHATGOOSE gates over frozen experts."""
from composition.evaluation import Scores, bits_per_byte, mixture, score_documents
from composition.loader import CompositionError, CompositionSettings, assemble, load_composed, new_parameters
from composition.blocks import CrossAttentionBlock
from composition.model import ComposedLM
from composition.training import fit_centers, train_independent, train_joint

__all__ = ["ComposedLM", "CompositionError", "CompositionSettings", "CrossAttentionBlock", "Scores", "assemble",
           "bits_per_byte", "fit_centers", "load_composed", "mixture", "new_parameters", "score_documents",
           "train_independent", "train_joint"]
