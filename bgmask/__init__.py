"""bgmask: masking strategies for background bias removal (baseline, early and late masking).

Mask convention, everywhere in this package: 1 = foreground (bird), 0 = background.
"""

__version__ = "0.1.0"
