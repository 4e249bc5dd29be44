"""Landmark-localization networks (Payer et al. 2016/2019, Huang et al.), all spatial_dims-generic."""
