"""Recipes and prompts: the recipe schema, template sampling and hand-token spans on CLIP tokens."""

from handsynth.prompts.modalities import ModalitiesEntry, read_modalities
from handsynth.prompts.recipe import Recipe, load_recipe
from handsynth.prompts.spans import HAND_LEXICON, free_text_prompt, hand_token_indices, lexicon_spans
from handsynth.prompts.templates import HAND_CONFIGS, Prompt, PromptSampler

__all__ = [
    "HAND_CONFIGS", "HAND_LEXICON", "ModalitiesEntry", "Prompt", "PromptSampler", "Recipe", "free_text_prompt",
    "hand_token_indices", "lexicon_spans", "load_recipe", "read_modalities",
]
