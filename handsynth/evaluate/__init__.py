"""``handsynth evaluate``: image-distribution metrics (FID/KID, FID-H/KID-H) and keypoint agreement
(hand confidence, MSE-2D/3D, PCK, handedness) of generated images, per-sample scores for export's gate."""
