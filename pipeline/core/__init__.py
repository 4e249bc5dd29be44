"""The base layer of heatmark: world <-> voxel geometry and output strides
(:mod:`~heatmark.core.geometry`), the one Gaussian heatmap function (:mod:`~heatmark.core.heatmaps`)
and atomic files, CSV cells, checksums and case names (:mod:`~heatmark.core.fileio`).

Everything else imports from here; this package imports only numpy and torch."""
