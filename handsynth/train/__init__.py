"""``handsynth train``: fit the guidance module (AttentionHand Eq. 2-9) on labelled real images."""
